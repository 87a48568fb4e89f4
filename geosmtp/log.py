"""Logging setup (loguru): one sink, text or JSON lines, a session or queue id on every line."""
from __future__ import annotations

import sys
from pathlib import Path

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
