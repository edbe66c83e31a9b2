"""pgroute run's start: a listener that cannot bind names the key to change."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from pgroute.app import _listen


async def test_address_in_use_names_the_key():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError) as exc:
            await _listen("api.listen", f"127.0.0.1:{port}", asyncio.start_server(lambda r, w: None, "127.0.0.1", port))
    finally:
        taken.close()
    assert exc.value.errno == errno.EADDRINUSE
    assert str(exc.value).startswith(f"[Errno {errno.EADDRINUSE}] api.listen = '127.0.0.1:{port}': ")
    assert "in use" in str(exc.value)
