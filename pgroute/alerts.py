"""Alerts: tell people about control-plane events over webhooks, a command hook and email.

Owns the alert channels configured in ``[alerts]`` and their delivery. The
controller's event listener calls :meth:`Alerter.emit`; everything slow happens in
background tasks. Invariants:

- ``emit`` never blocks and never raises: it only queues. A dead webhook cannot
  slow down a failover.
- Every channel (each webhook URL, the command, email) has its own queue and
  worker, so one slow channel does not delay the others; per channel, alerts
  are delivered in order.
- Which events: every event when it ends, and failover/failback/switchover also
  when they start (the page should arrive before the switch finishes).
- Failures are logged without secrets (webhook URLs are shown as scheme+host
  only, since Slack-style URLs carry their token in the path; DSNs are masked)
  and reported through ``on_failure(channel)`` (the metrics counter).
- A node that flaps is damped (``FlapDamper``): of the state changes of one node
  (down, up, refusing, replication stalled, resumed or diverged: an application
  that keeps updating rows a follower lacks raises its count at every probe), at
  most ``FLAP_LIMIT`` are alerted per ``FLAP_WINDOW``; the rest are counted, and the next alert of that
  node after the window says how many were held back. Switches, fences, rejoins
  and failures are never damped.
- Webhooks and email are retried ``alerts.retries`` times with exponential
  backoff; the command hook is not retried, because a hook may have side effects
  (a page, a ticket) and a retry after a timeout could fire them twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import smtplib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp

from .config import AlertsConfig
from .model import Event
from .pg.dsn import mask_dsn

log = logging.getLogger(__name__)

SWITCH_KINDS = frozenset({"failover", "failback", "switchover"})
#: Events that say how a node is, as opposed to what pgroute did: the damped ones.
NODE_STATE_KINDS = frozenset(
    {"node_down", "node_up", "node_refused", "replication_stalled", "replication_resumed", "replication_diverged"}
)
FLAP_LIMIT = 3
FLAP_WINDOW = 300.0
QUEUE_SIZE = 1000
MAX_BACKOFF = 30.0


class DeliveryError(Exception):
    """One delivery attempt failed; the message is already free of secrets."""


# -- secrets ---------------------------------------------------------------------------
_URL_RE = re.compile(r"(https?)://(?:[^@/\s'\"]*@)?([^/\s'\"?#]+)[^\s'\"]*")


def mask_url(url: str) -> str:
    """``https://hooks.slack.com/services/T0/B0/secret`` -> ``https://hooks.slack.com``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    return f"{parts.scheme}://{host}{port}"


def scrub(text: str) -> str:
    """Mask DSN passwords and cut every http(s) URL down to scheme+host."""
    return _URL_RE.sub(lambda m: f"{m.group(1)}://{m.group(2)}", mask_dsn(text))


# -- message ---------------------------------------------------------------------------
def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_text(event: Event) -> str:
    """One human line, Slack ``text`` and email subject: ``pgroute FAILOVER completed in
    2.31 s: primary down after 3 failed probes (epoch 4, active mirror)``."""
    kind = event.kind.replace("_", " ").upper()
    duration = f" in {event.ended_at - event.started_at:.2f} s" if event.ended_at is not None else ""
    if event.kind in SWITCH_KINDS:
        if event.ended_at is None:
            word = " started"
        elif event.result == "ok":
            word = " completed" + duration
        elif event.result == "refused":
            word = " refused"
        else:
            word = f" {(event.result or 'ended').upper()}" + (
                f" after {event.ended_at - event.started_at:.2f} s" if event.ended_at else ""
            )
    else:
        word = "" if event.result in (None, "ok") else f" {event.result.upper()}"
    details = dict(event.details)
    extra = ", ".join(f"{k} {details[k]}" for k in ("epoch", "active") if details.get(k))
    text = f"pgroute {kind}{word}: {event.reason}" + (f" ({extra})" if extra else "")
    return mask_dsn(text)


def event_payload(event: Event) -> dict[str, Any]:
    """The webhook body: Slack-compatible ``text`` plus structured fields."""
    data = event.to_json()
    payload: dict[str, Any] = {
        "text": alert_text(event),
        "id": event.id,
        "kind": event.kind,
        "stage": "ended" if event.ended_at is not None else "started",
        "result": event.result,
        "reason": event.reason,
        "started_at": event.started_at,
        "ended_at": event.ended_at,
        "time": _iso(event.ended_at if event.ended_at is not None else event.started_at),
        "phases": data["phases"],
        "details": data["details"],
    }
    details = data["details"]
    if "epoch" in details:
        try:
            payload["epoch"] = int(details["epoch"])
        except (TypeError, ValueError):
            payload["epoch"] = details["epoch"]
    if "active" in details:
        payload["active"] = details["active"] or None
    # Last line of defence: the controller's reasons may quote a driver message.
    return json.loads(mask_dsn(json.dumps(payload, default=str)))


class FlapDamper:
    """Decides which node-state events are alerted (see the module docstring). Pure
    apart from the times it is given."""

    def __init__(self, limit: int = FLAP_LIMIT, window: float = FLAP_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._sent: dict[str, list[float]] = {}  # node -> times of alerted state events
        self._held: dict[str, int] = {}  # node -> state events held back since the last alert

    def admit(self, event: Event, now: float) -> int | None:
        """None: hold this event back. Else: alert it, and the number returned is how
        many state events of its node were held back before it."""
        if event.kind not in NODE_STATE_KINDS:
            return 0
        node = str(dict(event.details).get("node", ""))
        sent = [t for t in self._sent.get(node, []) if now - t < self.window]
        if len(sent) >= self.limit:
            self._sent[node] = sent
            self._held[node] = self._held.get(node, 0) + 1
            return None
        self._sent[node] = [*sent, now]
        return self._held.pop(node, 0)


# -- channels ----------------------------------------------------------------------------
@dataclass
class _Channel:
    kind: str  # metric label: webhook | command | email
    label: str  # what logs may show (no secrets)
    send: Callable[[dict[str, Any]], Awaitable[None]]
    retries: int
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    task: asyncio.Task | None = None


class Alerter:
    """Delivers alerts for control-plane events. Wire ``emit`` as an event listener."""

    def __init__(
        self, config: AlertsConfig, on_failure: Callable[[str], None] | None = None, *, backoff: float = 0.5
    ) -> None:
        self._config = config
        self._on_failure = on_failure
        self._backoff = backoff
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._damper = FlapDamper()
        self._channels: list[_Channel] = []
        for url in config.webhook_urls:
            self._channels.append(_Channel("webhook", mask_url(url), self._webhook_sender(url), config.retries))
        if config.command:
            self._channels.append(_Channel("command", "command hook", self._run_command, 0))
        if config.email_to:
            smtp = config.smtp_url or "smtp://localhost:25"
            self._channels.append(_Channel("email", f"email via {mask_url(smtp)}", self._send_email, config.retries))

    @property
    def enabled(self) -> bool:
        return bool(self._channels)

    # -- producer side -----------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Queue alerts for ``event``. Never blocks, never raises."""
        try:
            if self._closed or not self._channels:
                return
            if event.ended_at is None and event.kind not in SWITCH_KINDS:
                return
            held = self._damper.admit(event, time.monotonic())
            if held is None:
                log.info("alert for %s event %d held back: the node is flapping", event.kind, event.id)
                return
            payload = event_payload(event)
            if held:
                payload["held_back"] = held
                payload["text"] += f" ({held} earlier change(s) of this node not alerted: flapping)"
            loop = self._loop
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if loop is not None and running is not loop:
                # Called from another thread: asyncio queues are not thread-safe.
                loop.call_soon_threadsafe(self._enqueue, payload)
            else:
                self._enqueue(payload)
        except Exception:
            log.exception("alerts: cannot queue event %s", getattr(event, "id", "?"))

    def _enqueue(self, payload: dict[str, Any]) -> None:
        for ch in self._channels:
            try:
                ch.queue.put_nowait(payload)
            except asyncio.QueueFull:
                log.warning("alerts: %s queue full, dropping alert %s %s", ch.label, payload["kind"], payload["stage"])
                self._failed(ch.kind)

    def _failed(self, channel: str) -> None:
        if self._on_failure is not None:
            try:
                self._on_failure(channel)
            except Exception:
                log.exception("alerts: on_failure callback failed")

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start one delivery worker per channel (alerts queued earlier are sent now)."""
        if self._loop is not None or not self._channels:
            return
        self._loop = asyncio.get_running_loop()
        if any(ch.kind == "webhook" for ch in self._channels):
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "pgroute-alerts", "Content-Type": "application/json"}
            )
        for ch in self._channels:
            ch.task = asyncio.create_task(self._worker(ch), name=f"alerts-{ch.kind}")
        log.info("alerts: %s", ", ".join(ch.label for ch in self._channels))

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting alerts, give queued ones up to ``timeout`` seconds, then stop."""
        self._closed = True
        workers = [ch.task for ch in self._channels if ch.task is not None]
        if workers:
            try:
                await asyncio.wait_for(asyncio.gather(*(ch.queue.join() for ch in self._channels)), timeout)
            except TimeoutError:
                left = sum(ch.queue.qsize() for ch in self._channels)
                log.warning("alerts: closing with %d alert(s) undelivered", left)
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- delivery --------------------------------------------------------------------------
    async def _worker(self, ch: _Channel) -> None:
        while True:
            payload = await ch.queue.get()
            try:
                await self._deliver(ch, payload)
            except asyncio.CancelledError:
                raise
            except Exception:  # the worker must outlive any single bad delivery
                log.exception("alerts: %s worker error", ch.label)
                self._failed(ch.kind)
            finally:
                ch.queue.task_done()

    async def _deliver(self, ch: _Channel, payload: dict[str, Any]) -> None:
        attempts = ch.retries + 1
        last = "unknown error"
        for attempt in range(attempts):
            try:
                await ch.send(payload)
                log.debug("alerts: %s delivered %s %s", ch.label, payload["kind"], payload["stage"])
                return
            except DeliveryError as exc:
                last = str(exc)
            except TimeoutError:
                last = f"timed out after {self._config.timeout:g} s"
            except (OSError, aiohttp.ClientError, smtplib.SMTPException, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < attempts:
                await asyncio.sleep(min(self._backoff * (2**attempt), MAX_BACKOFF))
        log.warning(
            "alerts: %s failed for %s %s after %d attempt(s): %s",
            ch.label,
            payload["kind"],
            payload["stage"],
            attempts,
            scrub(last),
        )
        self._failed(ch.kind)

    def _webhook_sender(self, url: str) -> Callable[[dict[str, Any]], Awaitable[None]]:
        async def send(payload: dict[str, Any]) -> None:
            assert self._session is not None
            timeout = aiohttp.ClientTimeout(total=self._config.timeout)
            async with self._session.post(url, data=json.dumps(payload), timeout=timeout) as resp:
                if resp.status >= 300:
                    # Not raise_for_status(): its message carries the full URL (and token).
                    raise DeliveryError(f"HTTP {resp.status}")

        return send

    async def _run_command(self, payload: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.update(
            {
                "PGROUTE_EVENT_ID": str(payload["id"]),
                "PGROUTE_EVENT_KIND": payload["kind"],
                "PGROUTE_EVENT_RESULT": payload["result"] or "",
                "PGROUTE_EVENT_REASON": payload["reason"],
                "PGROUTE_EVENT_STAGE": payload["stage"],
                "PGROUTE_EVENT_TEXT": payload["text"],
                "PGROUTE_EVENT_JSON": json.dumps(payload),
            }
        )
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            self._config.command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Own process group, so a timeout kills the shell's children too.
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self._config.timeout)
        except TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            raise DeliveryError(f"command timed out after {self._config.timeout:g} s") from None
        if proc.returncode != 0:
            tail = out.decode("utf-8", "replace").strip()[-300:]
            raise DeliveryError(f"command exited with status {proc.returncode}" + (f": {tail}" if tail else ""))

    async def _send_email(self, payload: dict[str, Any]) -> None:
        msg = EmailMessage()
        msg["Subject"] = payload["text"][:200]
        msg["From"] = self._config.email_from
        msg["To"] = ", ".join(self._config.email_to)
        msg.set_content(payload["text"] + "\n\n" + json.dumps(payload, indent=2) + "\n")
        await asyncio.to_thread(send_email, self._config.smtp_url or "smtp://localhost:25", msg, self._config.timeout)


def send_email(smtp_url: str, msg: EmailMessage, timeout: float) -> None:
    """Blocking SMTP delivery (run in a thread). ``smtp://`` upgrades with STARTTLS when
    the server offers it; ``smtps://`` is TLS from the first byte."""
    parts = urlsplit(smtp_url)
    if parts.scheme not in ("smtp", "smtps"):
        raise DeliveryError("alerts.smtp_url must start with smtp:// or smtps://")
    host = parts.hostname or "localhost"
    port = parts.port or (465 if parts.scheme == "smtps" else 25)
    context = ssl.create_default_context()
    server: smtplib.SMTP
    if parts.scheme == "smtps":
        server = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    else:
        server = smtplib.SMTP(host, port, timeout=timeout)
    with server:
        server.ehlo()
        if parts.scheme == "smtp" and server.has_extn("starttls"):
            server.starttls(context=context)
            server.ehlo()
        if parts.username:
            server.login(unquote(parts.username), unquote(parts.password or ""))
        server.send_message(msg)
