"""Shared test setup."""

import os

# Keras tests run with the torch backend (set before anything imports keras).
os.environ.setdefault("KERAS_BACKEND", "torch")
# Progress bars stay quiet in test logs.
os.environ.setdefault("BATCHNORM_PROGRESS", "0")

from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import matplotlib  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module of tiny models (no oversubscription of shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def float64_default() -> Iterator[None]:
    """float64 as torch's default dtype for a test (closed-form and hand-computed comparisons),
    restored afterwards for the other tests in the worker."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def isolated(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The lab's data lookup sees no real dataset: empty cache and system roots, no
    environment variable (the download and dataset tests)."""
    from batchnorm.lab import data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_ROOT", tmp_path / "system")
    return tmp_path


def run_into_closed_pipe(command: str, keep: int = 0, timeout: float = 120) -> Any:
    """Run the shell ``command`` with its stdout piped into ``head -c keep``, which exits after
    ``keep`` bytes: the writer's next line meets a closed pipe. Returns the CompletedProcess
    (text, both streams captured)."""
    import subprocess

    return subprocess.run(
        f"{command} | head -c {keep}",
        shell=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
