"""MoshpitOptimizer: the thread bridge, rounds from a synchronous loop, state download, shutdown.

These use real sockets on 127.0.0.1 and real threads (each optimizer runs its own trio loop in
its own thread, so they cannot share the in-memory network); every wait is bounded, and every
test closes what it opened. The protocol's timing and failure rules are tested under the
virtual clock elsewhere (test_averager*, test_state_download, test_progress).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from moshpit_trio.errors import ConfigError
from moshpit_trio.identity import Identity, PeerID
from moshpit_trio.training.optimizer import MoshpitOptimizer

pytestmark = pytest.mark.slow


def model_with(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


@contextmanager
def optimizers(*specs: dict[str, Any]) -> Iterator[list[MoshpitOptimizer]]:
    """Optimizers in order; each after the first bootstraps from the first."""
    with ExitStack() as stack:
        opts: list[MoshpitOptimizer] = []
        for spec in specs:
            spec = dict(spec)
            model = spec.pop("model")
            lr = spec.pop("lr", 0.0)
            torch_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            boot = [opts[0].address] if opts else []
            opt = MoshpitOptimizer(
                torch_opt,
                run_id=spec.pop("run_id", "t"),
                bootstrap=spec.pop("bootstrap", boot),
                start_timeout=30,
                **spec,
            )
            stack.callback(opt.close)
            opts.append(opt)
        yield opts


def in_threads(*calls: Callable[[], Any], timeout: float = 30.0) -> list[Any]:
    """Run blocking calls at once (one training thread each); return their results."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a training thread hung"
    if errors:
        raise errors[0]
    return results


def params(opt: MoshpitOptimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def step_with_grad(opt: MoshpitOptimizer) -> Any:
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    return opt.last_report


def test_every_step_averages_the_two_peers() -> None:
    a_model, b_model = model_with(0.0), model_with(2.0)
    common = {"grid": (2,), "average_every": 1, "round_timeout": 10.0, "load_state": False}
    with optimizers({"model": a_model, **common}, {"model": b_model, **common}) as (a, b):
        ra, rb = in_threads(lambda: step_with_grad(a), lambda: step_with_grad(b))
        assert ra.succeeded and rb.succeeded
        assert ra.group_id == rb.group_id
        for pa, pb in zip(params(a), params(b), strict=True):
            torch.testing.assert_close(pa, torch.full_like(pa, 1.0))
            torch.testing.assert_close(pb, pa)
        assert a.local_step == b.local_step == 1
        # the swarm view is readable from the training thread (the trio side keeps it fresh)
        assert a.swarm.peers and a.swarm.peers[0].peer_id is not None
        assert a.swarm.total_samples >= 1


def test_the_loss_and_the_rounds_go_into_the_progress_record() -> None:
    common = {"grid": (2,), "average_every": 1, "round_timeout": 10.0, "load_state": False}
    with optimizers({"model": model_with(0.0), **common}, {"model": model_with(2.0), **common}) as (
        a,
        b,
    ):

        def step(opt: MoshpitOptimizer, loss: Any) -> Any:
            for g in opt.param_groups:
                for p in g["params"]:
                    p.grad = torch.ones_like(p)
            opt.step(loss=loss)
            return opt.last_report

        in_threads(lambda: step(a, torch.tensor(3.0)), lambda: step(b, 5.0))
        own = {p.peer_id: p for p in a.swarm.peers}[PeerID.from_text(a.peer_id)]
        assert own.loss == 3.0 and own.started is not None
        in_threads(lambda: step(a, torch.tensor(3.0)), lambda: step(b, 5.0))
        # the view is taken at each step, before that step's round: the first round shows
        own = {p.peer_id: p for p in a.swarm.peers}[PeerID.from_text(a.peer_id)]
        assert (own.rounds_done, own.last_round, own.group_size) == (1, 0, 2)
        with pytest.raises(ConfigError, match="single number"):
            a.step(loss=torch.ones(2))
        with pytest.raises(ConfigError, match="number"):
            a.step(loss="low")  # type: ignore[arg-type]


def step_with(opt: MoshpitOptimizer, grad: float) -> Any:
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.full_like(p, grad)
    opt.step()
    opt.zero_grad()
    return opt.last_report


def test_average_state_also_averages_momentum_buffers() -> None:
    common = {
        "grid": (2,),
        "average_every": 1,
        "round_timeout": 10.0,
        "load_state": False,
        "lr": 0.1,
        "average_state": True,
    }
    with optimizers({"model": model_with(0.0), **common}, {"model": model_with(2.0), **common}) as (
        a,
        b,
    ):
        ra, rb = in_threads(lambda: step_with(a, 1.0), lambda: step_with(b, 3.0))
        assert ra.succeeded and rb.succeeded
        # local steps: a = 0 - 0.1*1 = -0.1, b = 2 - 0.1*3 = 1.7; momentum = the first grads
        for opt in (a, b):
            torch.testing.assert_close(params(opt)[0], torch.full_like(params(opt)[0], 0.8))
            for state in opt.optimizer.state.values():
                buf = state["momentum_buffer"]
                torch.testing.assert_close(buf, torch.full_like(buf, 2.0))


def test_average_every_counts_local_steps() -> None:
    a_model, b_model = model_with(0.0), model_with(4.0)
    common = {"grid": (2,), "average_every": 3, "round_timeout": 10.0, "load_state": False}
    with optimizers({"model": a_model, **common}, {"model": b_model, **common}) as (a, b):
        for _ in range(2):
            assert step_with_grad(a) is None and step_with_grad(b) is None
        assert params(a)[0].max() == 0.0  # lr=0: nothing changed, nothing averaged yet
        ra, _ = in_threads(lambda: step_with_grad(a), lambda: step_with_grad(b))
        assert ra.succeeded
        torch.testing.assert_close(params(a)[0], torch.full_like(params(a)[0], 2.0))


def test_a_joiner_downloads_parameters_optimizer_state_and_step() -> None:
    donor_model = model_with(1.0)
    with optimizers({"model": donor_model, "lr": 0.1, "average_every": 100}) as (donor,):
        for _ in range(5):
            step_with_grad(donor)
        joiner_model = model_with(-7.0)
        with optimizers(
            {
                "model": joiner_model,
                "lr": 0.1,
                "average_every": 100,
                "bootstrap": [donor.address],
            }
        ) as (joiner,):
            assert joiner.downloaded_from == donor.peer_id
            assert joiner.local_step == 5
            for pd, pj in zip(params(donor), params(joiner), strict=True):
                torch.testing.assert_close(pj, pd)
            donor_state = donor.optimizer.state_dict()["state"]
            joiner_state = joiner.optimizer.state_dict()["state"]
            assert donor_state.keys() == joiner_state.keys()
            for i in donor_state:
                torch.testing.assert_close(
                    joiner_state[i]["momentum_buffer"], donor_state[i]["momentum_buffer"]
                )
            # and it trains on from there like the donor would
            step_with_grad(joiner)
            assert joiner.local_step == 6


def test_a_restarted_peer_keeps_its_identity_and_resumes_from_the_swarm(tmp_path: Path) -> None:
    key = tmp_path / "peer.pem"
    with optimizers({"model": model_with(3.0), "average_every": 100}) as (donor,):
        for _ in range(4):
            step_with_grad(donor)
        with optimizers(
            {"model": model_with(0.0), "identity": key, "bootstrap": [donor.address]}
        ) as (first,):
            first_id = first.peer_id
        assert key.exists()
        with optimizers(
            {"model": model_with(0.0), "identity": key, "bootstrap": [donor.address]}
        ) as (again,):
            assert again.peer_id == first_id
            assert again.downloaded_from == donor.peer_id
            assert again.local_step == 4
            torch.testing.assert_close(params(again)[0], params(donor)[0])


def test_training_goes_on_after_the_bootstrap_peer_leaves() -> None:
    common = {"grid": (2,), "average_every": 1, "round_timeout": 10.0, "load_state": False}
    with optimizers(
        {"model": model_with(9.0), "average_every": 1000},
        {"model": model_with(0.0), **common},
        {"model": model_with(2.0), **common},
    ) as (boot, b, c):
        boot.close()
        for _ in range(2):
            rb, rc = in_threads(lambda: step_with_grad(b), lambda: step_with_grad(c))
            assert rb.succeeded and rc.succeeded
            assert set(rb.members) == set(rc.members) and len(rb.members) == 2
        torch.testing.assert_close(params(b)[0], torch.full_like(params(b)[0], 1.0))


@pytest.mark.parametrize("average_state", [False, True])
def test_background_rounds_overlap_local_steps_and_keep_local_progress(
    average_state: bool,
) -> None:
    # with average_state, the momentum buffers appear after the first local step: the
    # averager made before then (parameters only) is replaced by one that covers them too
    common = {
        "grid": (2,),
        "average_every": "background",
        "round_period": 0.5,
        "lr": 0.01,
        "load_state": False,
        "average_state": average_state,
    }
    with optimizers({"model": model_with(0.0), **common}, {"model": model_with(1.0), **common}) as (
        a,
        b,
    ):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            step_with_grad(a)
            step_with_grad(b)
            time.sleep(0.02)
            ra, rb = a.last_report, b.last_report
            if ra is not None and rb is not None and ra.succeeded and rb.succeeded:
                break
        else:
            pytest.fail("no successful background round within 20 s")
        # both took the same gradient steps; after averaging they differ only by the local
        # steps one took after the other's last delta was applied
        step_with_grad(a)
        step_with_grad(b)
        gap = (params(a)[0] - params(b)[0]).abs().max().item()
        assert gap < 1.0  # they started 1.0 apart; averaging brought them together


def test_close_during_a_background_round_returns_promptly() -> None:
    common = {"grid": (2,), "average_every": "background", "round_period": 2.0}
    with optimizers({"model": model_with(0.0), **common}) as (a,):
        time.sleep(2.5)  # a solo round is in matchmaking now, waiting for company
        started = time.monotonic()
        a.close()
        assert time.monotonic() - started < 8.0
        assert not a._bridge._thread.is_alive()
        with pytest.raises(ConfigError, match="after close"):
            a.step()


def test_an_exception_in_the_training_loop_shuts_the_peer_down() -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        optimizers({"model": model_with(0.0)}) as (opt,),
    ):
        thread = opt._bridge._thread
        raise RuntimeError("boom")
    thread.join(10)
    assert not thread.is_alive()


def test_interpreter_exit_without_close_does_not_hang() -> None:
    program = textwrap.dedent(
        """
        import torch
        from moshpit_trio.training.optimizer import MoshpitOptimizer
        model = torch.nn.Linear(2, 2)
        opt = MoshpitOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), run_id="x",
                               average_every="background", round_period=1.0)
        model(torch.ones(2)).sum().backward()
        opt.step()
        raise RuntimeError("the training script crashed")
        """
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "the training script crashed" in proc.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"average_every": 0}, "average_every"),
        ({"average_every": "often"}, "average_every"),
        ({"average_every": True}, "average_every"),
        ({"round_period": 1.0, "round_timeout": 2.0}, "shorter than round_period"),
        ({"round_timeout": -1}, "round_timeout"),
        ({"batch_size": 0}, "batch_size"),
        ({"bootstrap": "ws://127.0.0.1:1/x"}, "list of addresses"),
        ({"identity": 42}, "identity"),
        ({"grid": (4, 4), "target_group_size": 8}, "are for grid='auto'"),
        ({"grid": (4, 4), "max_group_size": 8}, "are for grid='auto'"),
        ({"target_group_size": 1}, "target_group_size must be at least 2"),
        ({"target_group_size": 20, "max_group_size": 16}, "target_group_size <= max_group_size"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, Any], match: str) -> None:
    model = model_with(0.0)
    with pytest.raises(ConfigError, match=match):
        MoshpitOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), run_id="bad", **kwargs)


def test_wraps_only_torch_optimizers() -> None:
    with pytest.raises(ConfigError, match=r"torch\.optim\.Optimizer"):
        MoshpitOptimizer(object(), run_id="bad")  # type: ignore[arg-type]


def test_identity_may_be_given_directly() -> None:
    identity = Identity.from_seed(b"\x07" * 32)
    with optimizers({"model": model_with(0.0), "identity": identity}) as (opt,):
        assert opt.peer_id == str(identity.peer_id)


def test_a_private_swarm_refuses_an_optimizer_not_on_its_allowlist() -> None:
    from moshpit_trio.dht.node import BootstrapFailed
    from moshpit_trio.wire.access import AccessPolicy

    member, stranger = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
    private = AccessPolicy(allowlist=[member.peer_id])
    with optimizers({"model": model_with(0.0), "identity": member, "access": private}) as (m,):
        model = model_with(1.0)
        with pytest.raises(BootstrapFailed):
            MoshpitOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.1),
                run_id="t",
                bootstrap=[m.address],
                identity=stranger,
                start_timeout=30,
            )
