from __future__ import annotations

import io
import json

import pytest
import structlog

from moshpit_trio.errors import ConfigError
from moshpit_trio.log import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_structlog() -> object:
    yield
    structlog.reset_defaults()


def test_json_lines_carry_the_bound_peer_id() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    get_logger(peer="mpabc").info("listening", address="ws://x")
    get_logger(peer="mpabc").debug("not shown at info")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "listening" and record["peer"] == "mpabc"
    assert record["level"] == "info" and "timestamp" in record


def test_console_format_for_people() -> None:
    out = io.StringIO()
    configure_logging("console", "warning", stream=out)
    get_logger(peer="mpabc").warning("protocol violation", reason="seq")
    text = out.getvalue()
    assert "protocol violation" in text and "reason=seq" in text and "peer=mpabc" in text


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "loud")])
def test_bad_settings_are_config_errors(fmt: str, level: str) -> None:
    with pytest.raises(ConfigError):
        configure_logging(fmt, level)  # type: ignore[arg-type]
