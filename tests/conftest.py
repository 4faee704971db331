"""Shared test setup."""

import os

# Keras tests run with the torch backend (set before anything imports keras).
os.environ.setdefault("KERAS_BACKEND", "torch")
# Progress bars stay quiet in test logs.
os.environ.setdefault("BATCHNORM_PROGRESS", "0")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
