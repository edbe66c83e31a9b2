"""Process logging: one line per record on stderr, text or JSON, passwords masked.

Owns the root handler pgroute installs and the masking filter. Invariants:

- Every record that reaches the handler has passed through ``mask_dsn``: the
  message, its arguments, the exception text and the stack text. A DSN password
  never reaches a log, even from an asyncpg exception message.
- One record is one line: in text format embedded newlines (tracebacks) are
  written as a literal ``\\n`` so log shippers and ``grep FAILOVER`` see one
  entry; in JSON format the exception is a field.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO

from .pg.dsn import mask_dsn

_HANDLER_NAME = "pgroute"


class MaskingFilter(logging.Filter):
    """Rewrites each record so its rendered message and exception text are masked.

    Installed on the handler (not on a logger) so records propagated from every
    module, including third-party ones, pass through it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad %-format must not lose the record
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = mask_dsn(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_dsn(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_dsn(record.stack_info)
        return True


def _utc_timestamp(created: float) -> str:
    seconds = int(created)
    ms = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-01-08T10:30:00.123Z INFO pgroute.control.controller FAILOVER ...``"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc_timestamp(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + record.stack_info
        return mask_dsn(line.replace("\r", "").replace("\n", "\\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message [, exception, stack]."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": _utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        return mask_dsn(json.dumps(data, ensure_ascii=False, default=str))


def setup_logging(level: str = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Install pgroute's stderr handler on the root logger (replacing an earlier one)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    # asyncio's debug chatter and one access line per scrape would bury the
    # events operators grep for; their warnings still come through.
    for noisy in ("asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
