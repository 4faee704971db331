"""The classic Keras batch-normalization example, with batchnorm's Keras layer.

A dense two-class classifier, as batch-normalization tutorials write it::

    Dense(64) → BatchNormalization → Activation('tanh') → Dropout(0.5)   (twice)
    Dense(2)  → BatchNormalization → Activation('softmax')

compiled with ``SGD(learning_rate=0.1, momentum=0.9, nesterov=True)`` and binary cross-entropy,
fitted with ``batch_size=16`` and ``validation_split=0.2`` on synthetic two-class data (offline,
deterministic). ``--layer both`` trains it once with ``batchnorm.keras.BatchNormalization`` and
once with ``keras.layers.BatchNormalization`` on the same data and seed, and prints both.

Run::

    KERAS_BACKEND=torch python examples/keras_dense.py --quick
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")  # a script may choose; the library never does

import keras  # noqa: E402
import numpy as np  # noqa: E402

from batchnorm.keras import BatchNormalization  # noqa: E402

CHANCE = 0.5  # two balanced classes
# Our layer and Keras' agree to float32 rounding and the runs share data, seed and dropout
# masks, so their accuracies differ only through rounding amplified by training; at the quick
# size 0.05 is 10 of the 200 validation samples.
TOLERANCE = 0.05


@dataclass(frozen=True)
class Config:
    n_samples: int = 2000
    n_features: int = 20
    epochs: int = 20
    batch_size: int = 16
    validation_split: float = 0.2
    learning_rate: float = 0.1
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(n_samples=1000, epochs=3)


def make_data(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """Two classes separated by a curved boundary in a few of the features (the rest is noise);
    labels one-hot, as for a softmax output with binary cross-entropy."""
    rng = np.random.default_rng(config.seed)
    x = rng.standard_normal((config.n_samples, config.n_features)).astype("float32")
    score = 1.5 * x[:, 0] - x[:, 1] + x[:, 2] * x[:, 3] + 0.5 * np.sin(3 * x[:, 4])
    y = (score > 0).astype("int64")
    x = x * rng.uniform(0.5, 5.0, config.n_features).astype("float32") + 3.0  # unnormalized
    return x, np.eye(2, dtype="float32")[y]


def build_model(config: Config, layer: str) -> Any:
    bn = BatchNormalization if layer == "batchnorm" else keras.layers.BatchNormalization
    model = keras.Sequential([keras.Input((config.n_features,))])
    for _ in range(2):
        model.add(keras.layers.Dense(64))
        model.add(bn())
        model.add(keras.layers.Activation("tanh"))
        model.add(keras.layers.Dropout(0.5))
    model.add(keras.layers.Dense(2))
    model.add(bn())
    model.add(keras.layers.Activation("softmax"))
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=config.learning_rate, momentum=0.9, nesterov=True
        ),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


def run(config: Config, layer: str = "batchnorm") -> dict[str, float]:
    """Train with ``layer`` ("batchnorm" or "keras"); return the final epoch's metrics."""
    if layer not in ("batchnorm", "keras"):
        raise ValueError(f"layer must be 'batchnorm' or 'keras', got {layer!r}")
    x, y = make_data(config)
    keras.utils.set_random_seed(config.seed)  # same weights and dropout masks for both layers
    model = build_model(config, layer)
    start = time.perf_counter()
    history = model.fit(
        x,
        y,
        epochs=config.epochs,
        batch_size=config.batch_size,
        validation_split=config.validation_split,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    final = {k: float(v[-1]) for k, v in history.history.items()}
    return {**final, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small size (a smoke test)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="at least 1 (default: 20, 3 with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", choices=["batchnorm", "keras", "both"], default="both")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, got {args.seed}")
    config = Config.quick() if args.quick else Config()
    overrides = {"seed": args.seed} | ({"epochs": args.epochs} if args.epochs is not None else {})
    config = Config(**{**config.__dict__, **overrides})
    layers = ["batchnorm", "keras"] if args.layer == "both" else [args.layer]
    print(f"{config}  (Keras backend: {keras.backend.backend()})")
    print(
        f"{'layer':<10} {'loss':>8} {'accuracy':>9} {'val_loss':>9} {'val_accuracy':>13} {'s':>6}"
    )
    for layer in layers:
        m = run(config, layer)
        print(
            f"{layer:<10} {m['loss']:8.4f} {m['accuracy']:9.4f} {m['val_loss']:9.4f} "
            f"{m['val_accuracy']:13.4f} {m['seconds']:6.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
