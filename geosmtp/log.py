"""Logging setup (loguru): one sink, text or JSON lines, a session or queue id on every line.

gevent's own error reports (a greenlet that died of an exception nobody caught) go through
the same sink as one record with the traceback in it, never raw onto stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path

import gevent
from loguru import logger

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {process} [{extra[sid]}] {message}"


def setup(level: str = "INFO", fmt: str = "text", file: Path | None = None) -> None:
    logger.remove()
    logger.configure(extra={"sid": "-"})
    sink = str(file) if file else sys.stderr
    # never enqueue=True: it starts a multiprocessing queue thread, which gevent does not want
    if fmt == "json":
        logger.add(sink, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(sink, level=level, format=TEXT_FORMAT, backtrace=False, diagnose=False)
    # The hub prints what it is handed with traceback.print_exception on its exception_stream
    # (stderr); its handle_error still decides what is an error and what stops the process.
    gevent.get_hub().print_exception = report_uncaught


def report_uncaught(context, kind, value, tb) -> None:
    """Hub.print_exception's signature: what failed (a greenlet, a callback) and the error.
    Must never raise (gevent's rule for the hub's error handling)."""
    try:
        where = context if isinstance(context, str) or context is None else repr(context)
        logger.opt(exception=(kind, value, tb)).error("uncaught {} in {}", getattr(kind, "__name__", kind), where)
    except Exception:  # noqa: BLE001 - a failing log sink has nowhere left to report to
        pass
