"""Flow control and close propagation of the byte pipe, with fake transports."""

import asyncio
import socket

import pytest

from pgroute.proxy import protocols, startup
from pgroute.proxy.protocols import BackendProtocol, ClientGone, ClientProtocol
from pgroute.proxy.router import ProxyStats


class FakeTransport(asyncio.Transport):
    """Records what the legs do; overrides every Transport method they call."""

    def __init__(self):
        self.written = bytearray()
        self.pauses = 0
        self.resumes = 0
        self.reading = True
        self.closing = False
        self.aborted = False
        self.buffer = 0
        self.limits = None
        self.protocol = None

    def get_extra_info(self, name, default=None):
        return default

    def set_write_buffer_limits(self, high=None, low=None):
        self.limits = (high, low)

    def get_write_buffer_size(self):
        return self.buffer

    def write(self, data):
        self.written += data

    def pause_reading(self):
        assert self.reading, "paused twice"
        self.reading = False
        self.pauses += 1

    def resume_reading(self):
        assert not self.reading, "resumed while reading"
        self.reading = True
        self.resumes += 1

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True

    def abort(self):
        self.closing = True
        self.aborted = True


def make_pipe(stats=None):
    stats = stats or ProxyStats()
    lost: list[ClientProtocol] = []
    client = ClientProtocol(stats, lambda c: None, lost.append)
    ct = FakeTransport()
    client.connection_made(ct)
    backend = BackendProtocol(client, stats)
    bt = FakeTransport()
    backend.connection_made(bt)
    return stats, client, ct, backend, bt, lost


def test_legs_get_explicit_write_buffer_limits():
    _, _, ct, _, bt, _ = make_pipe()
    assert ct.limits == bt.limits == (protocols.WRITE_BUFFER_HIGH, protocols.WRITE_BUFFER_LOW)


def test_attach_forwards_first_packet_and_pipelined_bytes_and_counts():
    stats, client, ct, backend, bt, _ = make_pipe()
    client.data_received(b"extra")  # arrived after the first packet, before pairing
    client.attach(backend, b"FIRST", epoch=3, backend_name="primary")
    assert bytes(bt.written) == b"FIRSTextra"
    client.data_received(b"Q...")
    backend.data_received(b"T....")
    assert bytes(bt.written) == b"FIRSTextraQ..."
    assert bytes(ct.written) == b"T...."
    assert stats.bytes_client_to_server == 14 and stats.bytes_server_to_client == 5
    assert client.epoch == 3 and client.backend_name == "primary"


def test_client_write_pressure_pauses_backend_reading_and_alternates():
    _, client, ct, backend, bt, _ = make_pipe()
    client.attach(backend, b"x", 1, "primary")
    client.pause_writing()  # client is slow: stop reading the backend
    assert (bt.pauses, bt.resumes, ct.pauses) == (1, 0, 0)
    client.pause_writing()  # a repeated pause must not pause twice
    assert bt.pauses == 1
    client.resume_writing()
    assert (bt.pauses, bt.resumes) == (1, 1)
    client.resume_writing()  # nor resume twice
    assert bt.resumes == 1
    client.pause_writing()
    assert (bt.pauses, bt.resumes) == (2, 1)


def test_backend_write_pressure_pauses_client_reading():
    _, client, ct, backend, bt, _ = make_pipe()
    client.attach(backend, b"x", 1, "primary")
    backend.pause_writing()  # e.g. a big COPY FROM faster than the backend takes it
    backend.pause_writing()
    assert (ct.pauses, bt.pauses) == (1, 0)
    backend.resume_writing()
    assert ct.resumes == 1 and ct.reading


def test_no_pause_on_a_closing_transport():
    _, client, _ct, backend, bt, _ = make_pipe()
    client.attach(backend, b"x", 1, "primary")
    bt.closing = True
    client.pause_writing()
    client.resume_writing()
    assert (bt.pauses, bt.resumes) == (0, 0)


def test_handshake_buffer_limit_pauses_until_attach():
    _, client, ct, backend, bt, _ = make_pipe()
    client.data_received(b"z" * (protocols.HANDSHAKE_PENDING_LIMIT + 1))
    assert ct.pauses == 1
    client.data_received(b"z")  # already paused: no second pause
    assert ct.pauses == 1
    client.attach(backend, b"F", 1, "primary")
    assert ct.resumes == 1
    assert len(bt.written) == protocols.HANDSHAKE_PENDING_LIMIT + 3


def test_handshake_limit_stays_paused_if_forwarding_fills_the_backend():
    _, client, ct, backend, bt, _ = make_pipe()
    client.data_received(b"z" * (protocols.HANDSHAKE_PENDING_LIMIT + 1))
    # Like a real transport, the write that crosses the high-water mark calls
    # pause_writing synchronously.
    bt.write = lambda data: backend.pause_writing()
    client.attach(backend, b"F", 1, "primary")
    assert not ct.reading and (ct.pauses, ct.resumes) == (2, 1)
    backend.resume_writing()
    assert ct.reading


def test_client_pressure_before_attach_applies_to_new_backend():
    _, client, _ct, backend, bt, _ = make_pipe()
    client.pause_writing()
    client.attach(backend, b"F", 1, "primary")
    assert bt.pauses == 1
    client.resume_writing()
    assert bt.resumes == 1


async def test_close_propagates_after_flush():
    _, client, ct, backend, bt, lost = make_pipe()
    client.attach(backend, b"x", 1, "primary")
    assert backend.eof_received() is False  # the transport closes itself
    backend.connection_lost(None)
    assert ct.closing and not ct.aborted  # close() flushes, abort() would not
    client.connection_lost(None)
    assert lost == [client]
    assert not bt.aborted


async def test_peer_that_never_reads_is_aborted(monkeypatch):
    monkeypatch.setattr(protocols, "CLOSE_FLUSH_TIMEOUT", 0.01)
    _, client, ct, backend, _bt, _ = make_pipe()
    client.attach(backend, b"x", 1, "primary")
    ct.buffer = 1000
    backend.connection_lost(None)
    assert ct.closing and not ct.aborted
    await asyncio.sleep(0.05)
    assert ct.aborted


def test_session_close_aborts_both_legs():
    _, client, ct, backend, bt, _ = make_pipe()
    client.attach(backend, b"x", 1, "primary")
    client.close("epoch 2")
    assert ct.aborted and bt.aborted


def test_buffered_sums_both_legs():
    _, client, ct, backend, bt, _ = make_pipe()
    client.attach(backend, b"x", 1, "primary")
    ct.buffer, bt.buffer = 300, 20
    assert client.buffered() == 320


async def test_read_packet_waits_then_returns_and_keeps_rest():
    _, client, _ct, _, _, _ = make_pipe()
    raw = startup.startup_message({"user": "app"})
    task = asyncio.ensure_future(client.read_packet())
    client.data_received(raw[:5])
    await asyncio.sleep(0)
    assert not task.done()
    client.data_received(raw[5:] + b"more")
    p = await task
    assert p.user == "app"
    assert bytes(client._buf) == b"more"


async def test_read_packet_raises_on_eof_and_garbage():
    _, client, _, _, _, _ = make_pipe()
    task = asyncio.ensure_future(client.read_packet())
    client.data_received(b"\0\0\0\x20\0\3")  # truncated
    await asyncio.sleep(0)
    client.eof_received()
    with pytest.raises(ClientGone):
        await task
    _, client, _, _, _, _ = make_pipe()
    client.data_received(b"\x0c\xeb\xc2\x00")  # 200 MB
    with pytest.raises(startup.StartupError):
        await client.read_packet()


async def test_connection_lost_cancels_handshake():
    _, client, _, _, _, lost = make_pipe()
    client.handshake = asyncio.ensure_future(asyncio.sleep(10))
    client.connection_lost(None)
    await asyncio.sleep(0)
    assert client.handshake.cancelled()
    assert lost == [client]


def test_backend_closes_itself_if_client_left_during_connect():
    stats = ProxyStats()
    client = ClientProtocol(stats, lambda c: None, lambda c: None)
    client.connection_made(FakeTransport())
    client.connection_lost(None)
    backend = BackendProtocol(client, stats)
    bt = FakeTransport()
    backend.connection_made(bt)
    assert bt.closing


def test_listening_socket_gets_keepalive_for_every_accepted_client():
    set_options = []

    class FakeSocket:
        def setsockopt(self, level, option, value):
            set_options.append((level, option, value))

    protocols.tune_listening_socket(FakeSocket())  # type: ignore[arg-type]  # only setsockopt is called
    assert set_options == [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]


def test_pairing_binds_the_peer_write_once():
    _, client, ct, backend, bt, _ = make_pipe()
    client.attach(backend, b"F", 1, "primary")
    # Each leg writes through the bound method it looked up when paired.
    assert client._peer_write == bt.write and backend._peer_write == ct.write
    client.data_received(b"Q1")
    backend.data_received(b"Z1")
    assert bytes(bt.written) == b"FQ1" and bytes(ct.written) == b"Z1"


async def test_read_packet_timeout_covers_the_whole_packet():
    _, client, _, _, _, _ = make_pipe()
    raw = startup.startup_message({"user": "app"})
    task = asyncio.ensure_future(client.read_packet(timeout=0.2))
    await asyncio.sleep(0.1)
    client.data_received(raw[:5])  # progress does not restart the clock
    with pytest.raises(TimeoutError):
        await task
    assert client._waiter is None
    # A packet already complete is returned without waiting, whatever the timeout.
    client.data_received(raw[5:])
    assert (await client.read_packet(timeout=0.0)).user == "app"
