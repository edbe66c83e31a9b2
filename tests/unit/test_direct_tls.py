"""Recognising a direct TLS client by its first bytes (pure, no sockets).

The ClientHello used here is a real one: Python's ssl module writes it into a memory
BIO, with the ALPN protocol libpq 17+ sends."""

from __future__ import annotations

import ssl

import pytest

from pgroute.proxy import direct_tls, startup
from pgroute.proxy.protocols import ClientProtocol
from pgroute.proxy.router import ProxyStats
from pgroute.proxy.startup import PacketKind, StartupError


def client_hello() -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = client_hello()


def test_a_real_client_hello_is_one_record_taken_whole():
    assert HELLO[0] == 0x16 and len(HELLO) == 5 + int.from_bytes(HELLO[3:5], "big")
    buf = bytearray(HELLO + b"more")
    packet = startup.take_packet(buf)
    assert packet is not None and packet.kind is PacketKind.DIRECT_TLS
    assert packet.raw == HELLO
    assert packet.encrypted and not packet.wants_encryption
    assert packet.user is None  # inside TLS: pgroute never sees who
    assert bytes(buf) == b"more"


def test_one_byte_at_a_time_waits_for_the_whole_record():
    buf = bytearray()
    for byte in HELLO:
        assert startup.take_packet(buf) is None
        buf.append(byte)
    packet = startup.take_packet(buf)
    assert packet is not None and packet.raw == HELLO and not buf


@pytest.mark.parametrize("minor", [0, 1, 2, 3, 4])
def test_every_tls_record_version_is_recognised(minor):
    record = bytes([0x16, 0x03, minor, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00])
    assert direct_tls.record_length(record) == len(record)
    packet = startup.take_packet(bytearray(record))
    assert packet is not None and packet.kind is PacketKind.DIRECT_TLS


def test_the_largest_record_is_accepted():
    record = bytes([0x16, 0x03, 0x01]) + direct_tls.MAX_RECORD_BODY.to_bytes(2, "big") + b"\x01"
    record += bytes(direct_tls.MAX_RECORD - len(record))
    assert len(record) == 16389
    packet = startup.take_packet(bytearray(record))
    assert packet is not None and packet.raw == record


@pytest.mark.parametrize(
    "data, refused_at",
    [
        (b"\x16\x02\x01\x00\x10\x01", 2),  # record version 2.x
        (b"\x16\x03\x05\x00\x10\x01", 3),  # record version 3.5
        (b"\x16\x03\x01\x00\x00\x01", 5),  # empty record
        (b"\x16\x03\x01\x40\x01\x01", 5),  # 2**14 + 1 bytes
        (b"\x16\x03\x01\xff\xff\x01", 5),  # a hostile length
        (b"\x16\x03\x01\x00\x10\x02", 6),  # a ServerHello, not a ClientHello
        (b"\x16\x03\x01\x00\x10\x14", 6),  # handshake type 20 (Finished)
    ],
)
def test_bytes_that_only_start_like_tls_are_refused_at_the_first_bad_byte(data, refused_at):
    for n in range(1, refused_at):
        assert startup.take_packet(bytearray(data[:n])) is None
    with pytest.raises(StartupError, match="starts like TLS") as e:
        startup.take_packet(bytearray(data[:refused_at]))
    assert e.value.sqlstate == "08P01"


def test_other_first_bytes_are_not_tls():
    assert not direct_tls.starts_tls(b"")
    assert not direct_tls.starts_tls(startup.startup_message({"user": "a"}))
    assert not direct_tls.starts_tls(startup.ssl_request())
    assert not direct_tls.starts_tls(b"\x15\x03\x01")  # an alert record is not a client's start
    assert direct_tls.starts_tls(b"\x16")
    # A StartupMessage is parsed as before; 0x16 as a length word is out of range anyway.
    packet = startup.take_packet(bytearray(startup.startup_message({"user": "a"})))
    assert packet is not None and packet.kind is PacketKind.STARTUP and not packet.encrypted


def test_the_alert_is_a_fatal_internal_error_openssl_understands():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    incoming.write(direct_tls.ALERT_INTERNAL_ERROR)
    with pytest.raises(ssl.SSLError, match="internal error"):
        tls.do_handshake()


def test_client_protocol_knows_an_incomplete_client_hello():
    client = ClientProtocol(ProxyStats(), lambda c: None, lambda c: None)
    assert not client.started_tls
    client.data_received(HELLO[:3])
    assert client.started_tls
    plain = ClientProtocol(ProxyStats(), lambda c: None, lambda c: None)
    plain.data_received(startup.startup_message({"user": "a"})[:3])
    assert not plain.started_tls
