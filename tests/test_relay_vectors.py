"""protocol/vectors/relay.json: current, reproduced by the code, and refused where invalid."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from moshpit_trio.identity import PeerID
from moshpit_trio.relays import decode_relays
from moshpit_trio.wire.address import PeerAddress
from moshpit_trio.wire.relay import DECODERS

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors"
DATA: dict[str, Any] = json.loads((VECTORS / "relay.json").read_text())


def test_the_committed_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("generate_relay", VECTORS / "generate_relay.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (VECTORS / "relay.json").read_text()


@pytest.mark.parametrize("vector", DATA["messages"], ids=lambda v: v["what"])
def test_every_message_decodes_and_reencodes_byte_for_byte(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    value = DECODERS[vector["message"]].decode(data)
    assert msgspec.msgpack.encode(value) == data


@pytest.mark.parametrize("vector", DATA["invalid"], ids=lambda v: v["what"])
def test_every_invalid_message_is_refused(vector: dict[str, Any]) -> None:
    with pytest.raises(msgspec.DecodeError):
        DECODERS[vector["message"]].decode(bytes.fromhex(vector["hex"]))


def test_the_record_value() -> None:
    carol = PeerID(bytes.fromhex(DATA["peers"]["carol"]))
    record = DATA["record"]
    assert record["key"] == f"mp.relay/{carol}"
    value = bytes.fromhex(record["value_hex"])
    assert decode_relays(value, carol) == [PeerAddress.parse(r) for r in record["relays"]]
