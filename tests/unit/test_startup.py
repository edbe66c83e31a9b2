"""First-packet parsing and the messages pgroute writes itself (pure, no sockets)."""

import struct

import pytest

from pgroute.proxy import startup
from pgroute.proxy.startup import PacketKind, StartupError


def test_startup_message_params():
    raw = startup.startup_message({"user": "app", "database": "chrispar", "application_name": "x"})
    p = startup.parse_first_packet(raw)
    assert p.kind is PacketKind.STARTUP
    assert p.protocol == startup.PROTOCOL_3_0
    assert p.user == "app" and p.database == "chrispar"
    assert dict(p.params) == {"user": "app", "database": "chrispar", "application_name": "x"}
    assert p.raw == raw
    assert not p.wants_encryption


def test_startup_database_defaults_to_user_and_empty_params():
    assert startup.parse_first_packet(startup.startup_message({"user": "bob"})).database == "bob"
    p = startup.parse_first_packet(startup.startup_message({}))
    assert dict(p.params) == {} and p.user is None


def test_startup_newer_minor_version_is_passed_through():
    # 3.2 (PostgreSQL 18): the backend negotiates it down, the proxy must not refuse.
    p = startup.parse_first_packet(startup.startup_message({"user": "a"}, protocol=(3 << 16) | 2))
    assert p.kind is PacketKind.STARTUP and p.protocol & 0xFFFF == 2


def test_ssl_and_gssenc_requests():
    ssl = startup.parse_first_packet(startup.ssl_request())
    assert ssl.kind is PacketKind.SSL_REQUEST and ssl.wants_encryption
    assert ssl.raw == struct.pack("!II", 8, 80877103)
    gss = startup.parse_first_packet(startup.gssenc_request())
    assert gss.kind is PacketKind.GSSENC_REQUEST and gss.wants_encryption
    assert gss.raw == struct.pack("!II", 8, 80877104)


def test_cancel_request():
    raw = struct.pack("!IIII", 16, 80877102, 4242, 0xDEADBEEF)
    p = startup.parse_first_packet(raw)
    assert p.kind is PacketKind.CANCEL_REQUEST
    assert p.pid == 4242 and p.secret_key == struct.pack("!I", 0xDEADBEEF)
    assert startup.cancel_request(4242, 0xDEADBEEF) == raw


@pytest.mark.parametrize(
    "raw, sqlstate",
    [
        (struct.pack("!II", 12, 80877103) + b"xxxx", "08P01"),  # SSLRequest too long
        (struct.pack("!III", 12, 80877102, 1), "08P01"),  # cancel without key
        (struct.pack("!II", 8, 2 << 16), "0A000"),  # protocol 2.0
        (struct.pack("!II", 8, 1234 << 16 | 9999), "0A000"),  # unknown request code
        (struct.pack("!II", 8, startup.PROTOCOL_3_0), "08P01"),  # no terminator
        (struct.pack("!II", 13, startup.PROTOCOL_3_0) + b"user\0", "08P01"),  # missing value
        (struct.pack("!II", 14, startup.PROTOCOL_3_0) + b"user\0x", "08P01"),  # no NUL at end
        (struct.pack("!II", 16, startup.PROTOCOL_3_0) + b"\0value\0\0", "08P01"),  # empty name
        (struct.pack("!II", 8, 80877103)[:7], "08P01"),  # shorter than 8
        (struct.pack("!II", 20, startup.PROTOCOL_3_0) + b"user\0a\0\0", "08P01"),  # length mismatch
    ],
)
def test_malformed_packets_are_refused(raw, sqlstate):
    with pytest.raises(StartupError) as e:
        startup.parse_first_packet(raw)
    assert e.value.sqlstate == sqlstate


@pytest.mark.parametrize("length", [0, 4, 7, 10001, 200_000_000, 0xFFFFFFFF])
def test_out_of_range_lengths_fail_on_the_header_alone(length):
    buf = bytearray(struct.pack("!I", length))
    with pytest.raises(StartupError, match="invalid length"):
        startup.take_packet(buf)


def test_garbage_is_refused_early():
    with pytest.raises(StartupError):
        startup.take_packet(bytearray(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))


def test_take_packet_waits_for_the_whole_packet_and_keeps_the_rest():
    raw = startup.startup_message({"user": "app"})
    buf = bytearray()
    for i in range(len(raw)):
        assert startup.take_packet(buf) is None
        buf.append(raw[i])
    buf += b"Qpipelined"
    p = startup.take_packet(buf)
    assert p is not None and p.raw == raw
    assert bytes(buf) == b"Qpipelined"


def test_max_length_is_accepted():
    body = b"user\0" + b"u" * (startup.MAX_STARTUP_PACKET_LENGTH - 8 - 5 - 2) + b"\0\0"
    raw = struct.pack("!II", 8 + len(body), startup.PROTOCOL_3_0) + body
    assert len(raw) == startup.MAX_STARTUP_PACKET_LENGTH
    packet = startup.take_packet(bytearray(raw))
    assert packet is not None and packet.kind is PacketKind.STARTUP


def test_error_response_round_trip():
    data = startup.error_response("53300", "sorry, too many clients already")
    assert data[:1] == b"E"
    assert struct.unpack("!I", data[1:5])[0] == len(data) - 1
    assert startup.parse_error_response(data) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "53300",
        "M": "sorry, too many clients already",
    }


def test_error_response_non_ascii_and_nul():
    data = startup.error_response("57P03", "nó\0de", severity="ERROR")
    fields = startup.parse_error_response(data)
    assert fields["M"] == "nó de" and fields["S"] == "ERROR"


def test_error_response_rejects_bad_sqlstate():
    with pytest.raises(ValueError):
        startup.error_response("5330", "x")


def test_parse_error_response_rejects_truncation():
    data = startup.error_response("08006", "x")
    with pytest.raises(ValueError):
        startup.parse_error_response(data[:-1])
