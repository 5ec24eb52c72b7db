"""A private swarm of real ``moshpit peer`` processes on 127.0.0.1: a stranger is refused at the
handshake, a member that floods calls is rate-limited and then banned, and the other members
keep averaging all along.

The daemons are processes (see test_daemon_chaos.py for the harness, which ends every one of
them); the stranger and the flooder are transports of this test process, over real TCP.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from moshpit_trio.errors import ConnectionLost, HandshakeFailed, Rejected
from moshpit_trio.identity import Identity
from moshpit_trio.wire.transport import open_transport
from tests.test_daemon_chaos import (
    Swarm,
    averaging_run,
    grouped,
    peer_config,
    started,
    stop_all,
    swarm,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.slow


def access(allowlist: list[Identity]) -> str:
    ids = ", ".join(f'"{i.peer_id}"' for i in allowlist)
    # Limits well above three members' own traffic (a round is a few calls per peer), well
    # below a flood of 300 calls at once.
    return f"""
[access]
allowlist = [{ids}]
calls_per_s = 50
call_burst = 100
ban_after_refusals = 20
refusal_window = 10
ban_base = 60
"""


async def dial(identity: Identity, address: str) -> BaseException | bytes:
    async with open_transport(identity, listen=None) as t:
        try:
            return await t.call(address, "status", b"", timeout=10)
        except (HandshakeFailed, Rejected) as exc:
            return exc


async def flood(identity: Identity, address: str, n: int) -> list[Any]:
    outcomes: list[Any] = []

    async with open_transport(identity, listen=None) as t:
        await t.connect(address, timeout=10)

        async def one() -> None:
            try:
                outcomes.append(await t.call(address, "status", b"", timeout=10))
            except (Rejected, ConnectionLost, HandshakeFailed) as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    return outcomes


@pytest.mark.timeout(120)
def test_a_stranger_is_refused_and_a_flooder_banned_while_the_swarm_averages(
    swarm: Swarm,  # noqa: F811
) -> None:
    members = [Identity.generate() for _ in range(3)]
    for i, identity in enumerate(members):
        identity.save(swarm.root / f"m{i}.pem")
    flooder, stranger = Identity.generate(), Identity.generate()
    run = access([*members, flooder]) + averaging_run(
        size=20_000, period=1.0, timeout=0.8, grid="[4]"
    )
    allow = str(swarm.admin.peer_id)
    boot = swarm.add("m0", peer_config("m0", bootstrap=[], allow=allow, run=run))
    boot.start()
    address = boot.wait_for(started, 30)["address"]
    ds = [boot] + [
        swarm.add(f"m{i}", peer_config(f"m{i}", bootstrap=[address], allow=allow, run=run))
        for i in (1, 2)
    ]
    for d in ds[1:]:
        d.start()
    for d in ds:
        d.wait_for(grouped, 60)

    # A stranger: refused at the handshake, with the reason, and logged.
    refused = trio.run(dial, stranger, address)
    assert isinstance(refused, HandshakeFailed), refused
    assert "not on the allowlist of this private swarm" in str(refused)
    line = boot.wait_for(lambda e: e["event"] == "connection refused", 10)
    assert line["remote"] == str(stranger.peer_id)

    # A member that floods: rate-limited, then banned; the ban is logged.
    mark = len(boot.lines())
    outcomes = trio.run(flood, flooder, address, 300)
    limited = [o for o in outcomes if isinstance(o, Rejected) and "rate limited" in o.reason]
    assert len(limited) >= 1, outcomes[:5]
    ban = boot.wait_for(lambda e: e["event"] == "peer banned", 10, after=mark)
    assert ban["remote"] == str(flooder.peer_id)
    assert (ban["reason"], ban["duration"]) == ("rate limit exceeded again and again", 60.0)
    again = trio.run(dial, flooder, address)
    assert isinstance(again, HandshakeFailed) and "banned for another" in str(again), again

    # The members go on averaging with each other while the flooder is banned.
    for d in ds:
        d.wait_for(
            lambda e: grouped(e) and len(e["members"]) == 3 and not e["excluded"],
            30,
            after=len(d.lines()),
        )
    stop_all(ds, shutdown_timeout=3.0)
