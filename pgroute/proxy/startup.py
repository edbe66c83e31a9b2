"""The first packet a PostgreSQL client sends, and the few messages pgroute writes itself.

Pure functions only: no sockets, no clock, no logging. The proxy reads exactly one
packet from a new client (a StartupMessage, SSLRequest, GSSENCRequest or
CancelRequest, or the first TLS record of a direct TLS client: ``direct_tls.py``),
decides where it goes, forwards it unchanged, and from then on never parses another
byte. It also writes a handful of messages of its own before any
backend is involved: ``error_response`` (an ErrorResponse the drivers show as the
server's error) and the single-byte ``N`` refusal of SSL/GSS encryption.

Invariants:

- A packet is accepted only when its announced length is within
  ``MIN_PACKET_LENGTH .. MAX_STARTUP_PACKET_LENGTH`` (PostgreSQL's own limit), so a
  hostile length never makes the proxy buffer more than 10000 bytes (a direct TLS
  ClientHello record: at most ``direct_tls.MAX_RECORD``, 16389 bytes).
- ``FirstPacket.raw`` is the packet exactly as received: forwarding it is byte-exact.
- Every malformed packet raises ``StartupError`` carrying the SQLSTATE and message
  PostgreSQL would use for it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from . import direct_tls

# Request codes live where a StartupMessage has its protocol version (src/include/libpq/pqcomm.h).
CANCEL_REQUEST_CODE = 80877102  # (1234 << 16) | 5678
SSL_REQUEST_CODE = 80877103  # (1234 << 16) | 5679
GSSENC_REQUEST_CODE = 80877104  # (1234 << 16) | 5680
PROTOCOL_3_0 = 3 << 16

MIN_PACKET_LENGTH = 8  # length word + code / protocol version
MAX_STARTUP_PACKET_LENGTH = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
# PostgreSQL 18 (protocol 3.2) allows secret keys of up to 256 bytes; 3.0 uses 4.
MAX_CANCEL_KEY_LENGTH = 256

# The one-byte answer to SSLRequest / GSSENCRequest meaning "not here, go on in plaintext".
ENCRYPTION_REFUSED = b"N"

_HEADER = struct.Struct("!II")
_INT32 = struct.Struct("!I")


class PacketKind(enum.Enum):
    STARTUP = "startup"
    SSL_REQUEST = "ssl_request"
    GSSENC_REQUEST = "gssenc_request"
    CANCEL_REQUEST = "cancel_request"
    DIRECT_TLS = "direct_tls"  # a TLS ClientHello record, no SSLRequest before it


@dataclass(frozen=True)
class FirstPacket:
    """One parsed startup-phase packet. Only the fields of its kind are set."""

    kind: PacketKind
    raw: bytes
    protocol: int = 0  # STARTUP: (major << 16) | minor
    params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    pid: int = 0  # CANCEL_REQUEST
    secret_key: bytes = b""  # CANCEL_REQUEST

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def database(self) -> str | None:
        # The server defaults the database to the user name; so do we, for display.
        return self.params.get("database") or self.params.get("user")

    @property
    def wants_encryption(self) -> bool:
        """An SSLRequest or GSSENCRequest: the client waits for a one-byte answer."""
        return self.kind in (PacketKind.SSL_REQUEST, PacketKind.GSSENC_REQUEST)

    @property
    def encrypted(self) -> bool:
        """The session negotiates encryption end to end (requested, or direct TLS)."""
        return self.kind is PacketKind.DIRECT_TLS or self.wants_encryption


class StartupError(ValueError):
    """A packet pgroute refuses; ``sqlstate`` and ``message`` go into the ErrorResponse."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


def packet_length(buf: bytes | bytearray) -> int | None:
    """The announced length of the packet at the start of ``buf`` (None: fewer than 4
    bytes so far). Raises ``StartupError`` as soon as the length is out of range, so
    a client announcing 200 MB is refused before it sends them."""
    if len(buf) < 4:
        return None
    (length,) = _INT32.unpack_from(buf, 0)
    if length < MIN_PACKET_LENGTH or length > MAX_STARTUP_PACKET_LENGTH:
        raise StartupError("invalid length of startup packet")
    return length


def take_packet(buf: bytearray) -> FirstPacket | None:
    """Remove and parse one complete packet from the front of ``buf``.

    Returns None while the packet is incomplete (``buf`` is left as is); bytes after
    the packet stay in ``buf`` (a pipelining client's next message).

    A ``buf`` starting with 0x16 is a direct TLS client: the packet is its first TLS
    record, whole (``direct_tls.record_length``)."""
    if direct_tls.starts_tls(buf):
        return _take_client_hello(buf)
    length = packet_length(buf)
    if length is None or len(buf) < length:
        return None
    raw = bytes(buf[:length])
    del buf[:length]
    return parse_first_packet(raw)


def _take_client_hello(buf: bytearray) -> FirstPacket | None:
    try:
        length = direct_tls.record_length(buf)
    except direct_tls.NotClientHello as e:
        raise StartupError(f"invalid startup packet: starts like TLS but {e}") from None
    if length is None or len(buf) < length:
        return None
    raw = bytes(buf[:length])
    del buf[:length]
    return FirstPacket(PacketKind.DIRECT_TLS, raw)


def parse_first_packet(raw: bytes) -> FirstPacket:
    """Parse exactly one packet (``raw`` is the whole packet, length word included)."""
    if len(raw) < MIN_PACKET_LENGTH:
        raise StartupError("incomplete startup packet")
    length, code = _HEADER.unpack_from(raw, 0)
    if length < MIN_PACKET_LENGTH or length > MAX_STARTUP_PACKET_LENGTH:
        raise StartupError("invalid length of startup packet")
    if length != len(raw):
        raise StartupError("incomplete startup packet")

    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if length != MIN_PACKET_LENGTH:
            raise StartupError("invalid length of encryption request packet")
        kind = PacketKind.SSL_REQUEST if code == SSL_REQUEST_CODE else PacketKind.GSSENC_REQUEST
        return FirstPacket(kind, raw)

    if code == CANCEL_REQUEST_CODE:
        key_length = length - 12
        if key_length < 4 or key_length > MAX_CANCEL_KEY_LENGTH:
            raise StartupError("invalid length of cancel request packet")
        (pid,) = _INT32.unpack_from(raw, 8)
        return FirstPacket(PacketKind.CANCEL_REQUEST, raw, pid=pid, secret_key=raw[12:])

    major = code >> 16
    if major != 3:
        # Any other "code" is either an unknown request or a protocol version we do not
        # speak (protocol 2 is gone since PostgreSQL 14). Minor versions above 0 are
        # passed through: the backend answers them with NegotiateProtocolVersion.
        raise StartupError(
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: server supports 3.0 to 3.0", sqlstate="0A000"
        )
    return FirstPacket(PacketKind.STARTUP, raw, protocol=code, params=_parse_params(raw))


def _parse_params(raw: bytes) -> Mapping[str, str]:
    body = raw[MIN_PACKET_LENGTH:]
    # name\0value\0 ... name\0value\0 \0: the body must end with the lone terminator.
    if not body or body[-1] != 0:
        raise StartupError("invalid startup packet layout: expected terminator as last byte")
    parts = body[:-1].split(b"\0")
    if parts == [b""]:  # no parameters at all
        return MappingProxyType({})
    if parts[-1] != b"" or len(parts) % 2 != 1:
        raise StartupError("invalid startup packet layout: expected terminator as last byte")
    parts.pop()
    params: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        name = parts[i].decode("utf-8", "replace")
        if not name:
            raise StartupError("invalid startup packet layout: empty parameter name")
        params[name] = parts[i + 1].decode("utf-8", "replace")
    return MappingProxyType(params)


def startup_message(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    """Build a StartupMessage (used by tests and tools; the proxy only forwards)."""
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return _HEADER.pack(8 + len(body), protocol) + body


def ssl_request() -> bytes:
    return _HEADER.pack(8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _HEADER.pack(8, GSSENC_REQUEST_CODE)


def cancel_request(pid: int, secret_key: int | bytes) -> bytes:
    key = _INT32.pack(secret_key) if isinstance(secret_key, int) else bytes(secret_key)
    return _HEADER.pack(12 + len(key), CANCEL_REQUEST_CODE) + _INT32.pack(pid) + key


def error_response(sqlstate: str, message: str, severity: str = "FATAL") -> bytes:
    """An ErrorResponse ('E') with S, V, C and M fields.

    Both S (localized) and V (never localized, protocol 3.0 since 9.6) are sent so every
    driver finds the severity where it looks; libpq prints ``FATAL:  <message>``,
    asyncpg raises the exception class of ``sqlstate``, psycopg shows the message."""
    if len(sqlstate) != 5 or not sqlstate.isascii():
        raise ValueError(f"SQLSTATE must be 5 ASCII characters: {sqlstate!r}")
    fields = (
        (b"S", severity),
        (b"V", severity),
        (b"C", sqlstate),
        (b"M", message),
    )
    # A NUL would end the field early and desynchronise the client's parser.
    body = b"".join(tag + value.replace("\0", " ").encode("utf-8") + b"\0" for tag, value in fields) + b"\0"
    return b"E" + _INT32.pack(4 + len(body)) + body


def parse_error_response(data: bytes) -> dict[str, str]:
    """Field code -> value of one ErrorResponse/NoticeResponse message (for tests and
    tools). Raises ValueError when ``data`` is not exactly one such message."""
    if len(data) < 6 or data[:1] not in (b"E", b"N"):
        raise ValueError("not an ErrorResponse")
    (length,) = _INT32.unpack_from(data, 1)
    if length + 1 != len(data) or data[-1] != 0:
        raise ValueError("truncated ErrorResponse")
    fields: dict[str, str] = {}
    for item in data[5:-1].split(b"\0")[:-1]:
        if not item:
            raise ValueError("empty field in ErrorResponse")
        fields[chr(item[0])] = item[1:].decode("utf-8", "replace")
    return fields
