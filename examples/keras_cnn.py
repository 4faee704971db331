"""A small Keras CNN with batch normalization, using batchnorm's Keras layer.

The classic layout on (Fashion-)MNIST-shaped 28×28×1 images, with batch normalization once
before and once after the activation (both placements are common in tutorials)::

    Conv2D(16) → BatchNormalization → ReLU → MaxPooling2D
    Conv2D(32) → ReLU → BatchNormalization → MaxPooling2D → Dropout(0.25)
    Flatten → Dense(64) → BatchNormalization → ReLU → Dropout(0.5) → Dense(10, softmax)

Data: a subset of Fashion-MNIST from ``/usr/share/datasets/fashion-mnist/`` (IDX files, Debian
package ``dataset-fashion-mnist``) when present, else scikit-learn's 8×8 digits upsampled to
28×28. ``--layer both`` trains with ``batchnorm.keras.BatchNormalization`` and with
``keras.layers.BatchNormalization`` on the same data and seed and prints both.

The layers use ``momentum=0.9``: with Keras' default 0.99 the moving statistics keep about
half their initial value after 70 steps (the quick size has 32, with 8 and 16 filters), so a
short run would be judged on stale statistics.

Run::

    KERAS_BACKEND=torch python examples/keras_cnn.py --quick
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")  # a script may choose; the library never does

import keras  # noqa: E402
import numpy as np  # noqa: E402

from batchnorm.keras import BatchNormalization  # noqa: E402
from batchnorm.lab.data import read_idx  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CHANCE = 0.1  # ten balanced classes
# Our layer and Keras' agree to float32 rounding and the runs share data, seed and dropout
# masks, so their accuracies differ only through rounding amplified by training; at the quick
# size 0.05 is about 6 of the 128 validation samples.
TOLERANCE = 0.05


@dataclass(frozen=True)
class Config:
    n_train: int = 3000
    n_test: int = 1000
    epochs: int = 2
    batch_size: int = 32
    validation_split: float = 0.2
    learning_rate: float = 0.05
    momentum: float = 0.9  # BatchNormalization's (Keras' convention)
    filters: tuple[int, int] = (16, 32)
    units: int = 64
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(n_train=640, n_test=300, epochs=2, filters=(8, 16), units=32)


@functools.lru_cache(maxsize=2)  # both layers train on the same arrays
def load_data(config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(x_train, y_train, x_test, y_test, source): images (N, 28, 28, 1) float32 in [0, 1]
    (not standardized: normalizing is batch normalization's job), integer labels."""
    rng = np.random.default_rng(config.seed)
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        xs, ys = (
            read_idx(FASHION_MNIST / f"{s}-idx3-ubyte.gz") for s in ("train-images", "t10k-images")
        )
        ls = [
            read_idx(FASHION_MNIST / f"{s}-idx1-ubyte.gz") for s in ("train-labels", "t10k-labels")
        ]
        tr = rng.choice(len(xs), config.n_train, replace=False)
        te = rng.choice(len(ys), config.n_test, replace=False)
        x_train, y_train = xs[tr], ls[0][tr]
        x_test, y_test = ys[te], ls[1][te]
        source = "Fashion-MNIST subset"
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 8×8 → 28×28: nearest-neighbour ×3 (24×24), zero border of 2
        img = np.kron(digits.images, np.ones((3, 3)))
        img = np.pad(img, ((0, 0), (2, 2), (2, 2))) * (255.0 / 16.0)
        order = rng.permutation(len(img))
        n_test = min(config.n_test, len(img) // 4)
        te, tr = order[:n_test], order[n_test:][: config.n_train]
        x_train, y_train = img[tr], digits.target[tr]
        x_test, y_test = img[te], digits.target[te]
        source = "scikit-learn digits, upsampled to 28x28"

    def prep(x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype="float32") / 255.0)[..., None]  # (N, 28, 28, 1)

    return prep(x_train), y_train.astype("int64"), prep(x_test), y_test.astype("int64"), source


def build_model(config: Config, layer: str) -> Any:
    bn_cls = BatchNormalization if layer == "batchnorm" else keras.layers.BatchNormalization
    L = keras.layers

    def bn() -> Any:
        return bn_cls(momentum=config.momentum)

    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Conv2D(config.filters[0], 3, padding="same"),
            bn(),  # before the activation (the paper's placement)
            L.Activation("relu"),
            L.MaxPooling2D(),
            L.Conv2D(config.filters[1], 3, padding="same"),
            L.Activation("relu"),
            bn(),  # after the activation
            L.MaxPooling2D(),
            L.Dropout(0.25),
            L.Flatten(),
            L.Dense(config.units),
            bn(),
            L.Activation("relu"),
            L.Dropout(0.5),
            L.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=config.learning_rate, momentum=0.9, nesterov=True
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def run(config: Config, layer: str = "batchnorm") -> dict[str, float]:
    """Train with ``layer`` ("batchnorm" or "keras"); return the final epoch's metrics and the
    test accuracy."""
    if layer not in ("batchnorm", "keras"):
        raise ValueError(f"layer must be 'batchnorm' or 'keras', got {layer!r}")
    x, y, x_test, y_test, _ = load_data(config)
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
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    final = {k: float(v[-1]) for k, v in history.history.items()}
    return {**final, "test_accuracy": float(test_accuracy), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small size (a smoke test)")
    parser.add_argument("--epochs", type=int, default=None, help="at least 1 (default: 2)")
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
    print(f"{config}  (data: {load_data(config)[4]}; Keras backend: {keras.backend.backend()})")
    print(
        f"{'layer':<10} {'loss':>8} {'accuracy':>9} {'val_accuracy':>13} {'test_accuracy':>14} {'s':>6}"
    )
    for layer in layers:
        m = run(config, layer)
        print(
            f"{layer:<10} {m['loss']:8.4f} {m['accuracy']:9.4f} {m['val_accuracy']:13.4f} "
            f"{m['test_accuracy']:14.4f} {m['seconds']:6.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
