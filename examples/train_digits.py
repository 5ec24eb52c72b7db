"""Train a small CNN on scikit-learn's digits with Moshpit SGD: one peer per process.

Start a first peer (it starts the swarm and prints its address), then any number of others
that bootstrap from it, each training on its own shard:

    python examples/train_digits.py --index 0 --peers 3
    # prints: peer ws://127.0.0.1:PORT/mp... listening
    python examples/train_digits.py --index 1 --peers 3 --bootstrap ws://127.0.0.1:PORT/mp...
    python examples/train_digits.py --index 2 --peers 3 --bootstrap ws://127.0.0.1:PORT/mp...

(`examples/run_swarm.sh N` does exactly that.) Stop one with Ctrl-C and start it again with
the same ``--key``: it downloads the swarm's state and carries on. The loop is an ordinary
PyTorch loop; the only Moshpit lines are the optimizer's construction and ``close()``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from moshpit_trio.torch import MoshpitOptimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, default=0, help="this peer's shard")
    parser.add_argument("--peers", type=int, default=1, help="how many shards")
    parser.add_argument("--bootstrap", action="append", default=[], help="a peer's address")
    parser.add_argument("--key", help="identity file (created if missing)")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y[order])
    x_test, y_test = x[:360], y[:360]
    x_train, y_train = x[360:][args.index :: args.peers], y[360:][args.index :: args.peers]

    torch.manual_seed(0)  # the same initial model on every peer
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip
    opt = MoshpitOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        run_id="digits-example",
        bootstrap=args.bootstrap,
        identity=args.key,
        average_every=4,  # one averaging round every 4 local steps
        round_period=1.0,  # rounds on a shared 1 s clock, so peers of any speed meet
        batch_size=32,
    )
    print(f"peer {opt.address} listening", flush=True)
    loss_fn = nn.CrossEntropyLoss()
    end = time.time() + args.seconds
    with opt:
        while time.time() < end:
            batch = torch.randint(len(x_train), (32,))
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            opt.step(loss=loss)  # published in the progress record: `moshpit dashboard` plots it
            opt.zero_grad()
            if opt.local_step % 20 == 0:
                with torch.no_grad():
                    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
                report = opt.last_report
                group = len(report.members) if report else 0
                print(f"step {opt.local_step}: test accuracy {acc:.3f}, last group {group}")


if __name__ == "__main__":
    main()
