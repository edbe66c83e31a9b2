"""Direct TLS: a client that opens with a TLS ClientHello instead of an SSLRequest.

libpq 17+ with ``sslnegotiation=direct`` (and ``sslmode=require`` or stricter) skips
the SSLRequest exchange and starts the TLS handshake at once; a PostgreSQL 17+ server
recognises it by the first byte, 0x16 (a TLS handshake record), which can never start
a startup packet (as a length word it would announce hundreds of megabytes).

This module owns recognising that start and the one message pgroute may say to such
a client. Pure functions only: no sockets, no clock, no logging.

- ``record_length`` checks the first TLS record header byte by byte, as far as the
  bytes received allow: content type 0x16, record version 3.x with x <= 4, a length of
  1 to 2**14 (RFC 8446 5.1; no hostile length makes pgroute buffer more than
  ``MAX_RECORD`` bytes), and a body that starts a ClientHello (handshake type 1).
  Anything else is ``NotClientHello``; the server turns that into the usual refusal
  of a bad startup packet.
- ``ALERT_INTERNAL_ERROR`` is a plaintext fatal TLS alert. pgroute never terminates
  TLS, so once a client has sent a ClientHello it cannot read an ErrorResponse (it
  would take it for a broken TLS record); a server may answer a ClientHello with an
  alert before any key exists, and libpq shows it as ``tlsv1 alert internal error``.
  The reason stays in pgroute's log and metrics.
"""

from __future__ import annotations

TLS_HANDSHAKE = 0x16  # TLS record content type: handshake
TLS_ALERT = 0x15  # TLS record content type: alert
CLIENT_HELLO = 0x01  # handshake message type
RECORD_HEADER = 5  # type (1), version (2), length (2)
MAX_RECORD_BODY = 1 << 14  # RFC 8446 5.1: a plaintext record carries at most 2**14 bytes
MAX_RECORD = RECORD_HEADER + MAX_RECORD_BODY
_MAX_MINOR = 0x04  # record versions 3.0 (SSL 3) to 3.4 (TLS 1.3 in name; 1.3 sends 3.1 or 3.3)

# Fatal (2) internal_error (80), with the record version TLS 1.2 and 1.3 servers use.
ALERT_INTERNAL_ERROR = bytes((TLS_ALERT, 0x03, 0x03, 0x00, 0x02, 0x02, 80))


class NotClientHello(ValueError):
    """Bytes that start like a TLS record (0x16) but are not a ClientHello."""


def starts_tls(buf: bytes | bytearray) -> bool:
    """True when ``buf`` (the first bytes of a connection) can only be a TLS start."""
    return len(buf) > 0 and buf[0] == TLS_HANDSHAKE


def record_length(buf: bytes | bytearray) -> int | None:
    """The length (header included) of the TLS record at the start of ``buf``, which
    ``starts_tls``; None while too few bytes have arrived to check it. Raises
    ``NotClientHello`` as soon as a received byte rules a ClientHello out, so garbage is
    refused without waiting for more."""
    n = len(buf)
    if n < 1 or buf[0] != TLS_HANDSHAKE:
        raise NotClientHello("not a TLS handshake record")
    if n >= 2 and buf[1] != 0x03:
        raise NotClientHello(f"TLS record version {buf[1]}.x is not 3.x")
    if n >= 3 and buf[2] > _MAX_MINOR:
        raise NotClientHello(f"TLS record version 3.{buf[2]} is unknown")
    if n < RECORD_HEADER:
        return None
    body = int.from_bytes(buf[3:5], "big")
    if body < 1 or body > MAX_RECORD_BODY:
        raise NotClientHello(f"TLS record length {body} is out of range")
    if n == RECORD_HEADER:
        return None
    if buf[RECORD_HEADER] != CLIENT_HELLO:
        raise NotClientHello(f"TLS handshake message type {buf[RECORD_HEADER]} is not a ClientHello")
    return RECORD_HEADER + body
