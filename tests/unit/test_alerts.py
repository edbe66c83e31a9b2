"""Alerts: webhook JSON to a real local receiver, non-blocking emit, command hook env,
email through a minimal local SMTP server, and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import socketserver
import threading
import time
from typing import cast

import pytest
from aiohttp import web

from pgroute.alerts import Alerter, FlapDamper, alert_text, event_payload, mask_url
from pgroute.config import AlertsConfig
from pgroute.model import Event

NOW = time.time()
FAILOVER_START = Event(5, "failover", "primary down after 3 failed probes", NOW - 2)
FAILOVER_DONE = Event(
    5,
    "failover",
    "primary down after 3 failed probes",
    NOW - 2,
    NOW,
    "ok",
    (("fence", 0.01), ("promote", 1.5)),
    (("epoch", "4"), ("active", "mirror")),
)
FAILBACK_FAILED = Event(6, "failback", "operator asked", NOW - 1, NOW, "failed")
NODE_DOWN_START = Event(7, "node_down", "primary: connection refused", NOW)
NODE_DOWN_DONE = Event(7, "node_down", "primary: connection refused", NOW, NOW, "ok")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def receiver():
    received: list[dict] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        arrived.set()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/services/T000/B000/secrettoken", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/services/T000/B000/secrettoken"
    yield url, received, arrived
    await runner.cleanup()


async def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_text_names_the_kind():
    assert alert_text(FAILOVER_START).startswith("pgroute FAILOVER started: primary down")
    text = alert_text(FAILOVER_DONE)
    assert text.startswith("pgroute FAILOVER completed in 2.00 s: primary down")
    assert "epoch 4" in text and "active mirror" in text
    assert "FAILBACK FAILED" in alert_text(FAILBACK_FAILED)
    assert alert_text(NODE_DOWN_DONE) == "pgroute NODE DOWN: primary: connection refused"
    leaky = Event(1, "failover", "cannot reach postgresql://u:hunter2@h/db", NOW)
    assert "hunter2" not in alert_text(leaky)
    assert "hunter2" not in json.dumps(event_payload(leaky))


def test_mask_url():
    assert mask_url("https://hooks.slack.com/services/T/B/tok") == "https://hooks.slack.com"
    assert mask_url("http://user:pw@127.0.0.1:8080/x?token=1") == "http://127.0.0.1:8080"


async def test_webhook_receives_json(receiver):
    url, received, _ = receiver
    failures: list[str] = []
    alerter = Alerter(AlertsConfig(webhook_urls=(url,), timeout=2.0), failures.append)
    await alerter.start()
    try:
        alerter.emit(NODE_DOWN_START)  # non-switch event start: not alerted
        alerter.emit(FAILOVER_START)
        alerter.emit(FAILOVER_DONE)
        alerter.emit(NODE_DOWN_DONE)
        await wait_for(lambda: len(received) == 3)
    finally:
        await alerter.close(2.0)
    start, done, down = received
    assert "FAILOVER" in start["text"] and start["stage"] == "started" and start["result"] is None
    assert "FAILOVER" in done["text"] and "completed" in done["text"]
    assert done["kind"] == "failover" and done["result"] == "ok"
    assert done["reason"] == "primary down after 3 failed probes"
    assert done["phases"] == {"fence": 0.01, "promote": 1.5}
    assert done["epoch"] == 4 and done["active"] == "mirror"
    assert done["started_at"] == FAILOVER_DONE.started_at and done["ended_at"] == NOW
    assert down["kind"] == "node_down" and down["stage"] == "ended"
    assert failures == []


async def test_unreachable_webhook_does_not_block_and_counts(caplog):
    url = f"http://127.0.0.1:{free_port()}/services/T/B/topsecret"
    failures: list[str] = []
    alerter = Alerter(AlertsConfig(webhook_urls=(url,), timeout=1.0, retries=2), failures.append, backoff=0.01)
    await alerter.start()
    try:
        with caplog.at_level(logging.WARNING, logger="pgroute.alerts"):
            t0 = time.perf_counter()
            for _ in range(20):
                alerter.emit(FAILOVER_DONE)
            assert time.perf_counter() - t0 < 0.05  # emit only queues
            await wait_for(lambda: len(failures) >= 1)
    finally:
        await alerter.close(0.2)
    assert failures[0] == "webhook"
    assert "after 3 attempt(s)" in caplog.text
    assert "topsecret" not in caplog.text and "/services" not in caplog.text


async def test_http_error_is_a_failure(receiver):
    url, _, _ = receiver
    bad = url.rsplit("/", 1)[0] + "/wrongtoken"  # 404 on the receiver
    failures: list[str] = []
    alerter = Alerter(AlertsConfig(webhook_urls=(bad,), retries=1), failures.append, backoff=0.01)
    await alerter.start()
    try:
        alerter.emit(FAILOVER_DONE)
        await wait_for(lambda: failures == ["webhook"])
    finally:
        await alerter.close(1.0)


async def test_emit_never_raises_even_closed_or_unconfigured():
    Alerter(AlertsConfig()).emit(FAILOVER_DONE)
    alerter = Alerter(AlertsConfig(command="true"))
    alerter.emit(object())  # type: ignore[arg-type]  # garbage on purpose
    await alerter.close(0.1)
    alerter.emit(FAILOVER_DONE)


async def test_command_hook_gets_event_env(tmp_path):
    out = tmp_path / "env.txt"
    alerter = Alerter(AlertsConfig(command=f"env | grep '^PGROUTE_EVENT_' > '{out}'"))
    await alerter.start()
    try:
        alerter.emit(FAILOVER_DONE)
        await wait_for(lambda: out.exists() and "PGROUTE_EVENT_JSON" in out.read_text())
        await alerter.close(2.0)
    finally:
        await alerter.close(0.1)
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert env["PGROUTE_EVENT_KIND"] == "failover"
    assert env["PGROUTE_EVENT_RESULT"] == "ok"
    assert env["PGROUTE_EVENT_REASON"] == "primary down after 3 failed probes"
    assert env["PGROUTE_EVENT_ID"] == "5"
    assert json.loads(env["PGROUTE_EVENT_JSON"])["kind"] == "failover"


async def test_command_failure_and_timeout_are_counted():
    failures: list[str] = []
    alerter = Alerter(AlertsConfig(command="exit 3"), failures.append)
    await alerter.start()
    try:
        alerter.emit(FAILOVER_DONE)
        await wait_for(lambda: failures == ["command"])
    finally:
        await alerter.close(0.5)
    failures.clear()
    alerter = Alerter(AlertsConfig(command="sleep 30", timeout=0.2), failures.append)
    await alerter.start()
    try:
        t0 = time.monotonic()
        alerter.emit(FAILOVER_DONE)
        await wait_for(lambda: failures == ["command"], timeout=3)
        assert time.monotonic() - t0 < 2
    finally:
        await alerter.close(0.5)


class _SmtpServer(socketserver.ThreadingTCPServer):
    """Keeps the messages its handlers received."""

    messages: list[str]


class _SmtpHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP to accept one message (no STARTTLS, no AUTH)."""

    def handle(self) -> None:
        self.wfile.write(b"220 test ESMTP\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            cmd = line.decode().strip().upper()
            if cmd.startswith(("EHLO", "HELO")):
                self.wfile.write(b"250-test\r\n250 8BITMIME\r\n")
            elif cmd.startswith("DATA"):
                self.wfile.write(b"354 go\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = self.rfile.readline()
                    if not chunk:
                        return
                    data += chunk
                cast(_SmtpServer, self.server).messages.append(data.decode())
                self.wfile.write(b"250 queued\r\n")
            elif cmd.startswith("QUIT"):
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


async def test_email_via_smtp():
    server = _SmtpServer(("127.0.0.1", 0), _SmtpHandler)
    server.messages = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        failures: list[str] = []
        alerter = Alerter(
            AlertsConfig(email_to=("ops@example.com",), smtp_url=f"smtp://127.0.0.1:{port}"), failures.append
        )
        await alerter.start()
        try:
            alerter.emit(FAILOVER_DONE)
            await wait_for(lambda: server.messages)
        finally:
            await alerter.close(1.0)
        msg = server.messages[0]
        assert "Subject: pgroute FAILOVER completed" in msg
        assert "To: ops@example.com" in msg
        assert failures == []
    finally:
        server.shutdown()
        server.server_close()


def _state_event(i: int, kind: str, node: str = "mirror") -> Event:
    return Event(i, kind, f"standby {node} {kind}", NOW, NOW, "ok", (), (("node", node),))


def test_flap_damper_holds_back_a_flapping_node_and_counts():
    damper = FlapDamper(limit=3, window=300.0)
    kinds = ["node_down", "node_up"] * 5  # a follower flapping every 2 s
    admitted = [damper.admit(_state_event(i, k), now=2.0 * i) for i, k in enumerate(kinds)]
    assert admitted[:3] == [0, 0, 0] and admitted[3:] == [None] * 7
    # Another node is not held back by this one; a switch never is.
    assert damper.admit(_state_event(50, "node_down", "primary"), now=20.0) == 0
    assert damper.admit(FAILOVER_DONE, now=20.0) == 0
    # After the window, the next change is alerted and says how many were held back.
    assert damper.admit(_state_event(99, "node_up"), now=2.0 * 3 + 300.0) == 7
    assert damper.admit(_state_event(100, "node_down"), now=2.0 * 3 + 301.0) == 0


async def test_flapping_node_alerts_are_damped(receiver):
    url, received, _ = receiver
    alerter = Alerter(AlertsConfig(webhook_urls=(url,), timeout=2.0))
    await alerter.start()
    try:
        for i in range(10):
            alerter.emit(_state_event(i, "node_down" if i % 2 == 0 else "node_up"))
        alerter.emit(FAILOVER_DONE)
        await wait_for(lambda: len(received) == 4)
        await asyncio.sleep(0.2)  # nothing else arrives
    finally:
        await alerter.close(2.0)
    assert [r["kind"] for r in received] == ["node_down", "node_up", "node_down", "failover"]
