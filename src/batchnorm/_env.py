"""Reading the switches of the environment (``BATCHNORM_BACKEND``, ``BATCHNORM_NATIVE``) on
every call, cheaply.

``os.environ.get`` of a name that is not set raises and catches a ``KeyError`` inside
``Mapping.get``: ~15–20 µs when the caches are cold after a large pass, paid twice by every
layer call. The same lookup in the mapping's own dictionary costs ~1 µs. Where that dictionary
is not there (another Python implementation), ``os.environ.get`` serves.
"""

from __future__ import annotations

import os

__all__ = [
    "OFF",
    "get",
    "is_off",
    "numba_threads_problem",
    "check_numba_threads",
    "ON",
    "switch",
    "switch_problem",
    "OUTPUT_CACHE_VARIABLE",
    "MAX_OUTPUT_CACHE_BYTES",
    "output_cache_bytes",
    "output_cache_problem",
]

#: the spellings of "off" a switch accepts (trimmed, any case), as BATCHNORM_PROGRESS does
OFF = ("0", "false", "no", "off")
#: and of "on" (as is an empty value)
ON = ("1", "true", "yes", "on")

# CPython keeps os.environ's contents in ``_data``: bytes keys and values on POSIX
_DATA = getattr(os.environ, "_data", None)
_FAST = os.name == "posix" and isinstance(_DATA, dict)
# the names read at every layer call, encoded before any call: a call inside torch.compile
# that filled this dict would change what the compiled graph guards on (compiled twice)
_KEYS: dict[str, bytes] = {n: os.fsencode(n) for n in ("BATCHNORM_BACKEND", "BATCHNORM_NATIVE")}


def get(name: str) -> str | None:
    """``os.environ.get(name)``: the value as ``os.environ`` holds it now, or None."""
    if not _FAST:
        return os.environ.get(name)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    value = _DATA.get(key)  # type: ignore[union-attr]
    return None if value is None else os.fsdecode(value)


def switch(name: str) -> bool:
    """The switch ``name``: False for one of :data:`OFF`, True for one of :data:`ON`, an empty
    value or none; :class:`ValueError` naming it for anything else (a typo such as ``of`` would
    otherwise leave it on unseen)."""
    value = get(name)
    if value is None:
        return True
    v = value.strip().lower()
    if v in OFF:
        return False
    if v in ON or not v:
        return True
    raise ValueError(
        f"${name} is {value!r}; it takes {', '.join(OFF)} (off) or {', '.join(ON)} (on), in "
        "any case"
    )


def switch_problem(name: str) -> str | None:
    """Why the switch ``name`` is refused (:func:`switch`), None if it is not."""
    try:
        switch(name)
    except ValueError as e:
        return str(e)
    return None


def is_off(name: str) -> bool:
    """Whether the switch ``name`` is set to one of :data:`OFF`."""
    value = get(name)
    return value is not None and value.strip().lower() in OFF


def numba_threads_problem() -> str | None:
    """Why ``$NUMBA_NUM_THREADS`` is refused (None if it is not): Numba refuses a count below 1
    with a bare ``ValueError`` from deep inside its own import, and a value that is not a whole
    number it ignores (all cores) with a traceback printed as a warning."""
    value = get("NUMBA_NUM_THREADS")
    if value is None or not value.strip():
        return None
    remedy = f"set it to a count from 1 to {os.cpu_count() or 1}, or unset it (all cores)"
    try:
        count = int(value)
    except ValueError:
        return f"$NUMBA_NUM_THREADS is {value!r}, which is not a whole number of threads; {remedy}"
    if count >= 1:
        return None
    return (
        f"$NUMBA_NUM_THREADS is {value!r}, but the kernels' threads must number at least 1; "
        f"{remedy}"
    )


def check_numba_threads() -> None:
    """Raise :class:`ValueError` with :func:`numba_threads_problem`'s message, before Numba is
    imported (the kernels and their torch adapter call it first)."""
    problem = numba_threads_problem()
    if problem is not None:
        raise ValueError(problem)


#: the output caches' budget in MiB (see :func:`batchnorm.set_output_cache_budget`)
OUTPUT_CACHE_VARIABLE = "BATCHNORM_OUTPUT_CACHE_MB"
_DEFAULT_OUTPUT_CACHE_MB = 512
#: the largest budget either cache takes: 1 TiB
MAX_OUTPUT_CACHE_BYTES = 1 << 40


def output_cache_bytes() -> int:
    """The output caches' budget in bytes that ``$BATCHNORM_OUTPUT_CACHE_MB`` asks for (512 MiB
    when it is not set; 0 keeps no output); :class:`ValueError` naming the variable when it is
    not a whole number of MiB from 0 to 1048576 (1 TiB)."""
    value = get(OUTPUT_CACHE_VARIABLE)
    if value is None or not value.strip():
        return _DEFAULT_OUTPUT_CACHE_MB << 20
    try:
        mib = int(value)
    except ValueError:
        mib = -1
    if 0 <= mib <= MAX_OUTPUT_CACHE_BYTES >> 20:
        return mib << 20
    raise ValueError(
        f"${OUTPUT_CACHE_VARIABLE} is {value!r}; it takes the output caches' budget as a whole "
        f"number of MiB from 0 to {MAX_OUTPUT_CACHE_BYTES >> 20} (0 keeps no output; unset: "
        f"{_DEFAULT_OUTPUT_CACHE_MB})"
    )


def output_cache_problem() -> str | None:
    """Why ``$BATCHNORM_OUTPUT_CACHE_MB`` is refused (:func:`output_cache_bytes`), None if it
    is not."""
    try:
        output_cache_bytes()
    except ValueError as e:
        return str(e)
    return None
