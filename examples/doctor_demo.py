"""The doctor on a small buggy model: "good in train mode, bad in eval mode".

A classifier for scikit-learn's 8×8 digits is trained with three classic mistakes in its
definition (a bias before BN, Dropout right before BN, a Keras momentum in PyTorch's
convention), then saved the way that loses the running statistics (parameters only). The
doctor is run on the reloaded model, the fix it names is applied (``batchnorm.recalibrate``),
and the doctor is run again.

Run:  python examples/doctor_demo.py [--out DIR]     (a few seconds on one core)

With ``--out DIR`` it also saves the inputs and both checkpoints, so the command line can be
tried on them (exit code 1 before the fix, 0 after)::

    batchnorm doctor examples/doctor_demo.py:make_model --data DIR/x_train.pt \
        --checkpoint DIR/deployed.pt --batch-size 32
    batchnorm doctor examples/doctor_demo.py:make_model --data DIR/x_train.pt \
        --checkpoint DIR/recalibrated.pt --batch-size 32
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import batchnorm


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 64),  # bias=True right before BN: redundant
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.5),  # Dropout right before BN: variance shift at inference
        nn.BatchNorm1d(64, momentum=0.99),  # Keras' 0.99 in PyTorch's convention
        nn.Linear(64, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also save inputs and checkpoints here")
    args = parser.parse_args()
    if args.out:  # before the training: a bad --out should not cost the run
        if args.out.exists() and not args.out.is_dir():
            parser.error(f"--out {args.out}: exists and is not a folder")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"--out {args.out}: cannot create the folder ({e.strerror or e})")
    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y))
    x, y = x[perm], y[perm]
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(10):
        model.train()
        for i in range(0, len(x_train), 32):
            loss = nn.functional.cross_entropy(model(x_train[i : i + 32]), y_train[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()

    # the bug: a checkpoint of the parameters only — the BN buffers are left behind
    params_only = {k: v.detach().clone() for k, v in model.named_parameters()}
    deployed = make_model()
    deployed.load_state_dict(params_only, strict=False)
    deployed.eval()

    # the train-mode number is measured on a copy: a forward pass in train mode would update
    # the running statistics (another classic way to corrupt them)
    acc_train = accuracy(copy.deepcopy(deployed).train(), x_test, y_test)
    print(f"test accuracy in train mode (batch statistics): {acc_train:.3f}")
    print(
        f"test accuracy in eval mode:                     {accuracy(deployed, x_test, y_test):.3f}"
    )
    if args.out:
        torch.save(x_train, args.out / "x_train.pt")
        torch.save(deployed.state_dict(), args.out / "deployed.pt")
    print()
    report = batchnorm.doctor(deployed, x_train, num_batches=8, batch_size=32)
    print(report)

    print()
    print("--- after batchnorm.recalibrate(deployed, torch.split(x_train, 32)) ---")
    batchnorm.recalibrate(deployed, torch.split(x_train, 32))
    print(f"test accuracy in eval mode: {accuracy(deployed.eval(), x_test, y_test):.3f}")
    if args.out:
        torch.save(deployed.state_dict(), args.out / "recalibrated.pt")
    print()
    print(batchnorm.doctor(deployed, x_train, num_batches=8, batch_size=32))


if __name__ == "__main__":
    main()
