"""Typed experiment configs: a dataclass per experiment, inheriting :class:`BaseConfig`.

``--set key=value`` converts ``value`` to the field's declared type (``bool``, ``int``,
``float``, ``str``, ``X | None``, ``tuple[T, ...]``/``list[T]`` as comma-separated values,
``Literal[...]``); an unknown key or an unconvertible value raises :class:`ConfigError`
listing the valid keys. ``--quick`` applies the class's ``QUICK`` overrides first, so
``--set`` still wins over them.

Example::

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class MyConfig(BaseConfig):
    ...     lr: float = 0.1
    ...     widths: tuple[int, ...] = (100, 100)
    >>> make_config(MyConfig, sets=["lr=0.5", "widths=32,32"]).widths
    (32, 32)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, Union

__all__ = [
    "BaseConfig",
    "ConfigError",
    "make_config",
    "config_to_dict",
    "parse_value",
    "check_positive",
    "check_non_negative",
    "check_fraction",
    "check_widths",
]


class ConfigError(ValueError):
    """An unknown config key or a value that does not convert to the field's type."""


@dataclass
class BaseConfig:
    """Fields every experiment has.

    Attributes:
        dataset: ``auto``, ``mnist``, ``fashion-mnist``, ``digits`` or ``synthetic``.
        data_dir: where to look for IDX files first (``None``: the default search path).
        download: fetch MNIST / Fashion-MNIST if missing.
        seeds: how many seeds to run (``seed``, ``seed+1``, …); results report mean ± spread.
        seed: the first seed.
        quick: smoke size (set by ``--quick``; the class's ``QUICK`` overrides are applied).
        threads: torch CPU threads during training (small MLPs are fastest on 1).
    """

    dataset: str = "auto"
    data_dir: str | None = None
    download: bool = False
    seeds: int = 1
    seed: int = 0
    quick: bool = False
    threads: int = 1

    # overrides applied by --quick (before --set); each experiment sets its own
    QUICK: ClassVar[dict[str, Any]] = {}

    def seed_list(self) -> list[int]:
        """The seeds this config runs."""
        return [self.seed + i for i in range(self.seeds)]

    def at_least_one(self, *names: str) -> None:
        """Refuse, naming the first of them and its value, a field in ``names`` below 1 (a
        count: steps, an evaluation interval, a window)."""
        for name in names:
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")

    def validate(self) -> None:
        """Check value ranges; experiments extend this (call ``super().validate()``)."""
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")
        if not (-MAX_SEED <= self.seed and self.seed + self.seeds - 1 <= MAX_SEED):
            raise ConfigError(
                f"seed must be from {-MAX_SEED} to {MAX_SEED} with seeds-1 added, got seed="
                f"{self.seed} and seeds={self.seeds}"
            )
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, float) and math.isfinite(v) and abs(v) > FLOAT32_MAX:
                    raise ConfigError(
                        f"{f.name} must be within float32's range (at most {FLOAT32_MAX:.4g} "
                        f"in size), got {v}"
                    )
        from batchnorm.lab.data import DATASET_NAMES

        if self.dataset not in DATASET_NAMES:
            raise ConfigError(
                f"dataset must be one of {', '.join(DATASET_NAMES)}, got {self.dataset!r}"
            )
        if self.dataset in ("digits", "synthetic") and (self.data_dir is not None or self.download):
            given = " and ".join(
                flag
                for flag, on in (
                    ("--data-dir", self.data_dir is not None),
                    ("--download", self.download),
                )
                if on
            )
            raise ConfigError(
                f"{given} would be ignored: dataset {self.dataset!r} is built in and reads no "
                "files; drop it, or choose --dataset auto, mnist or fashion-mnist"
            )


C = TypeVar("C", bound=BaseConfig)


# Range checks for ``validate``: a value out of range must stop the run before it starts, as one
# line naming the field, not as a traceback from torch (an optimizer, a layer) minutes into it.


#: the largest float32: learning rates, momenta and scales end up in float32 tensors (an
#: optimizer's, a model's), where a larger finite value overflows mid-run
FLOAT32_MAX = 3.4028234663852886e38

#: the seeds a run may use (``seed`` to ``seed + seeds − 1``, offsets added): what torch's and
#: Python's generators take
MAX_SEED = 2**62


def check_positive(**values: float) -> None:
    """Each value finite and > 0 (learning rates, scales)."""
    for k, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{k} must be positive and finite, got {v}")


def check_non_negative(**values: float) -> None:
    """Each value finite and >= 0 (SGD momentum, weight decay, decay factors)."""
    for k, v in values.items():
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"{k} must be >= 0 and finite, got {v}")


def check_distinct(**values: tuple[Any, ...]) -> None:
    """Each list of arms or grid points without repeats (a repeat would run and count twice)."""
    for k, v in values.items():
        repeated = sorted({x for x in v if v.count(x) > 1}, key=str)
        if repeated:
            raise ConfigError(
                f"{k} lists {', '.join(map(str, repeated))} more than once: each value is an arm "
                f"of the experiment; list each once (got {','.join(map(str, v))})"
            )


def check_fraction(**values: float) -> None:
    """Each value in [0, 1] (a BN layer's momentum: the weight of the new batch)."""
    for k, v in values.items():
        if not 0 <= v <= 1:
            raise ConfigError(f"{k} must be in [0, 1], got {v}")


def check_widths(**values: tuple[int, ...]) -> None:
    """Each a non-empty list of layer widths (channels, units), all >= 1."""
    for k, v in values.items():
        if not v or min(v) < 1:
            raise ConfigError(
                f"{k} must list at least one layer width, each >= 1 (e.g. --set {k}=8,16), got "
                f"{','.join(map(str, v)) or 'nothing'}"
            )


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(text: str, tp: Any, key: str = "value") -> Any:
    """Convert the command-line string ``text`` to type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(text, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ConfigError(f"{key}: {text!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        parts = text.split(",")
        if text.strip() and any(not t.strip() for t in parts):
            # "32,,32" or a trailing comma: an item left out, not an item to drop unseen
            raise ConfigError(
                f"{key}: {text!r} has an empty item; separate the items by single commas, "
                "e.g. 32,32"
            )
        items = [t.strip() for t in parts if t.strip()]
        inner = args[0] if args else str
        vals = [parse_value(t, inner, key) for t in items]
        return tuple(vals) if origin is tuple else vals
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if tp in (int, float, str):
        try:
            value = tp(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {text!r}") from None
        if tp is float and not math.isfinite(value):
            # NaN compares unequal to every bound a validate() checks, and a config file
            # cannot record it
            raise ConfigError(f"{key}: expected a finite number, got {text!r}")
        return value
    raise ConfigError(f"{key}: cannot set fields of type {tp!r} from the command line")


def _fields(cls: type[BaseConfig]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_sets(sets: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(sets, Mapping):
        return dict(sets)
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def make_config(
    cls: type[C],
    *,
    quick: bool = False,
    sets: Iterable[str] | Mapping[str, Any] = (),
    **values: Any,
) -> C:
    """Build a config: defaults, then ``cls.QUICK`` if ``quick``, then ``values`` (typed, e.g.
    from CLI flags; ``None`` means "not given"), then ``sets`` (strings converted to the field's
    type). Unknown keys raise :class:`ConfigError`."""
    fields = _fields(cls)
    merged: dict[str, Any] = {}
    if quick:
        merged.update(cls.QUICK)
        merged["quick"] = True
    merged.update({k: v for k, v in values.items() if v is not None})
    for k, v in _parse_sets(sets).items():
        if k == "quick" and "quick" in fields:
            # the flag also labels the report as a smoke test; a --set could drop that label
            raise ConfigError("quick: use the --quick flag (quick=True in Python), not --set")
        if k not in fields:
            raise ConfigError(
                f"unknown config key {k!r} for {cls.__name__}; valid keys: {', '.join(fields)}"
            )
        merged[k] = parse_value(v, fields[k], k) if isinstance(v, str) else v
    unknown = [k for k in merged if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown} for {cls.__name__}; valid keys: {', '.join(fields)}"
        )
    cfg = cls(**merged)
    cfg.validate()
    return cfg


def config_to_dict(cfg: BaseConfig) -> dict[str, Any]:
    """The config as JSON-ready data (tuples become lists)."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
