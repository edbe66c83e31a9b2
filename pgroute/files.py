"""Reading the files an operator names (configuration, env file, state file).

Owns one rule: only regular files are read. A FIFO would block the open (and the
read) until someone writes to it, a directory fails with a confusing errno and a
device may never end; each of them is refused at once with a message instead.
"""

from __future__ import annotations

import os
import stat

#: A configuration or state file is a few kilobytes; anything far bigger is not one.
MAX_BYTES = 16 * 1024 * 1024


class NotRegularFile(OSError):
    """The path exists but is not a regular file (FIFO, directory, device, socket)."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "something else"


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path``; NotRegularFile (an OSError) when it is not a regular file,
    other OSErrors as the system reports them."""
    # O_NONBLOCK: opening a FIFO with no writer would otherwise block forever; the
    # fstat below then refuses it before any read.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(0, f"is {_kind(mode)}, not a regular file", str(path))
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BYTES:
                raise NotRegularFile(0, f"larger than {MAX_BYTES} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)
