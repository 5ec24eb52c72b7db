"""Logging: structlog, console lines for people, JSON lines for daemons.

Library code takes a logger from ``get_logger(...)`` and binds what it knows (peer id, remote
peer, run id, round); ``configure_logging`` is for programs (the CLI, daemons, tests), never
called by the library itself, so embedding applications keep their own set-up.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

__all__ = ["configure_logging", "get_logger"]

LogFormat = Literal["console", "json"]


def configure_logging(
    fmt: LogFormat = "console", level: str | int = "info", stream: TextIO | None = None
) -> None:
    """Send structlog output to ``stream`` (stderr by default) as console text or JSON lines."""
    if fmt not in ("console", "json"):
        from .errors import ConfigError

        raise ConfigError(f"log format must be 'console' or 'json', got {fmt!r}")
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        from .errors import ConfigError

        raise ConfigError(f"unknown log level {level!r} (use debug, info, warning or error)")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` key/values on every line (e.g. ``peer=pid.short``)."""
    if not structlog.is_configured():
        # Unconfigured structlog prints every level to stdout; a library should not. Warnings
        # and errors go to stderr until the program configures logging itself.
        configure_logging("console", "warning")
    return structlog.get_logger("moshpit").bind(**bound)
