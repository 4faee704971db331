"""Every ``>>>`` example in the package's docstrings runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import batchnorm

MODULES = sorted(m.name for m in pkgutil.walk_packages(batchnorm.__path__, "batchnorm."))


def test_the_examples_are_found() -> None:
    # a module list that came out empty would pass every case below
    assert "batchnorm.kernels" in MODULES and "batchnorm.lab.config" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
