"""The training run of ``peers/trainer.toml``: a small CNN on scikit-learn's digits.

The daemon calls ``main(context)`` in a worker thread (``entry = "train_digits:main"``; this
file is found because it sits next to the configuration). ``context.optimizer(...)`` gives a
``MoshpitOptimizer`` already set up for the run (run id, grid, round period, bootstrap, its own
key file); the loop trains until the daemon is asked to stop. Needs ``pip install -e ".[demo]"``
(scikit-learn).
"""

from __future__ import annotations

from typing import Any


def main(context: Any) -> None:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from torch import nn

    from moshpit_trio.log import get_logger

    lr = float(context.options.get("lr", 0.05))
    batch_size = int(context.options.get("batch_size", 32))
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y[order])
    x_test, y_test, x_train, y_train = x[:360], y[:360], x[360:], y[360:]
    torch.manual_seed(0)  # the same initial model on every peer
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip
    log = get_logger(run=context.run_id)
    loss_fn = nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    with context.optimizer(sgd, batch_size=batch_size) as opt:
        while not context.should_stop():
            batch = torch.randint(len(x_train), (batch_size,))
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            opt.step(loss=loss)  # the loss goes into the progress record (the dashboard's)
            opt.zero_grad()
            if opt.local_step % 200 == 0:
                with torch.no_grad():
                    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
                log.info("training", step=opt.local_step, test_accuracy=round(acc, 4))
