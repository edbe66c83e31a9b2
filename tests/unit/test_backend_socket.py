"""backend_socket.open_socket against loopback listeners: literals, names, refusals."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pgroute.proxy.backend_socket import open_socket


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_connects_to_a_literal_and_to_a_name(host):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = await open_socket(asyncio.get_running_loop(), host, listener.getsockname()[1])
        try:
            assert sock.getpeername() == listener.getsockname()
            assert not sock.getblocking()
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        finally:
            sock.close()


async def test_a_refused_connect_names_the_address():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    # The port was just released: nothing listens there.
    with pytest.raises(OSError, match=rf"Connect call failed \('127.0.0.1', {port}\)"):
        await open_socket(asyncio.get_running_loop(), "127.0.0.1", port)
