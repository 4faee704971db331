"""Smoke runs of the claims experiments at --quick size on scikit-learn's digits: every run must
complete, write its files and figures, and produce claims whose boolean verdicts follow from
the numbers stored next to them (each verdict is recomputed here from ``measured``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from batchnorm.lab import registry
from batchnorm.lab import train as lab_train
from batchnorm.lab.config import ConfigError
from batchnorm.lab.experiments import (
    _nets,
    dropout,
    ics,
    initialization,
    learning_rate,
    noisy_bn,
    paper_mnist,
    placement,
    smoothness,
)
from batchnorm.lab.results import Claim, _jsonable, load_run

EXPERIMENTS = (
    "learning-rate",
    "placement",
    "dropout",
    "initialization",
    "noisy-bn",
    "ics",
    "smoothness",
)


def _lt(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a < b


def _sub(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else a - b


def _ranked_diff(m: dict[str, Any], plain: float | None, worst: float = -math.inf) -> Any:
    """first - second of the two arms in ``m["diverged_seeds"]`` (in that order), ranked: an
    arm with a diverged seed scores ``worst``; ``None`` when both diverged."""
    (_, da), (_, db) = m["diverged_seeds"].items()
    if da and db:
        return None
    if da:
        return worst
    if db:
        return -worst
    return plain


def _rank(value: Any, diverged: int, worst: float) -> Any:
    return worst if diverged else value


def _beats_spread(m: dict[str, Any], sign: bool = True) -> bool:
    d = _ranked_diff(m, m["difference"])
    if d is None:
        return False
    return bool(d > m["spread"] and d > 0) if sign else bool(abs(d) > m["spread"])


def _benefit(m: dict[str, Any], prefix: str) -> float | None:
    """Held-out accuracy at the rate chosen on the validation set minus that without dropout."""
    val = {
        a: _rank(v, m["diverged_seeds"][a], -math.inf)
        for a, v in m["val_acc"].items()
        if a.startswith(prefix + "-p") and a != prefix + "-p0"
    }
    scored = [(v, a) for a, v in val.items() if v is not None]
    if not scored:
        return None
    best = max(scored)[1]
    assert m["chosen"][prefix] == best
    acc = {a: _rank(v, m["diverged_seeds"][a], -math.inf) for a, v in m["acc"].items()}
    if acc[best] is None or acc.get(prefix + "-p0") is None:
        return None
    d = acc[best] - acc[prefix + "-p0"]
    return None if math.isnan(d) else d


def _fewer_steps(nobn: list[Any], arm: list[Any], never: int, difference: float) -> bool:
    """Every seed of ``arm`` reaches the target, and no-BN (a seed that never reaches it counts
    as ``never``) needs more steps on average by more than std + std of the steps."""
    if None in arm:
        return False
    a = [never if v is None else v for v in nobn]
    diff = float(np.mean(a) - np.mean(arm))
    assert diff == pytest.approx(difference)
    return diff > 0 and diff > float(np.std(a) + np.std(arm))


def _bn_faster(m: dict[str, Any]) -> bool:
    """placement: both placements reach the target in fewer steps than no-BN (see
    :func:`_fewer_steps`); a diverged seed ranks lowest (no-BN's: the placement wins; the
    placement's: it loses)."""
    d, per = m["diverged_seeds"], m["steps_per_seed"]

    def wins(b: str) -> bool:
        if d[b] or None in per[b]:
            return False
        never = m["never_reached_as"]
        return bool(d["none"]) or _fewer_steps(per["none"], per[b], never, m["difference"][b])

    return all(wins(b) for b in ("before", "after"))


def _reaches_faster(m: dict[str, Any], arm: str) -> bool:
    """learning-rate: ``arm`` reaches the target in fewer steps than no-BN (see
    :func:`_fewer_steps`)."""
    per = m["steps_per_seed"]
    return _fewer_steps(per["noBN"], per[arm], m["never_reached_as"], m["difference"])


# claim id (or id prefix) -> the verdict recomputed from the claim's measured numbers
RECOMPUTE: dict[str, Callable[[dict[str, Any]], bool]] = {
    # learning-rate
    "bn-trains-faster": lambda m: _reaches_faster(m, "BN-Baseline"),
    "bn-x5-14x-fewer-steps": lambda m: _reaches_faster(m, "BN-x5"),
    "nobn-x5-diverges": lambda m: (
        m["diverged"] or m["final_accuracy"] is None or m["final_accuracy"] < m["learn_threshold"]
    ),
    "sigmoid-needs-bn": lambda m: (
        m["BN-x5-Sigmoid_final"] is not None
        and m["BN-x5-Sigmoid_final"] >= m["learn_threshold"]
        and not (
            m["noBN-Sigmoid_final"] is not None and m["noBN-Sigmoid_final"] >= m["learn_threshold"]
        )
    ),
    "bn-larger-stable-lr": lambda m: (
        m["largest_stable_lr_BN"] is not None
        and (
            m["largest_stable_lr_noBN"] is None
            or m["largest_stable_lr_BN"] > m["largest_stable_lr_noBN"]
        )
    ),
    # placement (an arm with a diverged seed ranks lowest: m["diverged_seeds"])
    "before-better-": _beats_spread,
    "placement-matters-": lambda m: _beats_spread(m, sign=False),
    "bn-faster-": _bn_faster,
    # dropout
    "bn-reduces-dropout-benefit": lambda m: _lt(_benefit(m, "BN"), _benefit(m, "noBN")),
    "bn-regularizes": lambda m: (
        not all(m["diverged_seeds"].values())
        and _lt(
            _rank(m["gap_BN"], m["diverged_seeds"]["BN-p0"], math.inf),
            _rank(m["gap_noBN"], m["diverged_seeds"]["noBN-p0"], math.inf),
        )
    ),
    "dropout-before-bn-variance-shift": lambda m: (
        (
            d := _ranked_diff(
                m,
                _sub(m["mean_abs_log_ratio"]["shift_arm"], m["mean_abs_log_ratio"]["safe_arm"]),
                math.inf,
            )
        )
        is not None
        and d > 0
    ),  # fmt: skip
    "variance-shift-hurts": _beats_spread,
    # initialization
    "bn-init-insensitive": lambda m: (
        m["trained_scales_BN"] > 0
        and (m["trained_scales_noBN"] == 0 or m["range_BN"] < m["range_noBN"])
    ),
    "bn-init-fewer-failures": lambda m: m["failures_BN"] < m["failures_noBN"],
    # noisy-bn
    "noisy-bn-as-good-as-bn": lambda m: (
        (d := _ranked_diff(m, m["difference"])) is not None and d >= -m["tolerance"]
    ),
    "noisy-bn-beats-standard": _beats_spread,
    "noisy-bn-less-stable": lambda m: (
        (d := _ranked_diff(m, m["difference"], math.inf)) is not None and d > 0 and d > m["spread"]
    ),
    # ics (diverged_seeds in the order noBN, BN; a diverged arm's shift is +inf)
    "bn-does-not-reduce-ics-": lambda m: all(
        (d := _ranked_diff(m, m[f"difference_{k}"], math.inf)) is not None
        and not (d > 0 and d > m[f"spread_{k}"])
        for k in ("one_minus_cos", "relative_l2")
    ),
    # smoothness (noBN, BN; a diverged arm or a non-finite probe is +inf)
    "bn-smaller-": lambda m: (
        (d := _ranked_diff(m, m["difference"], math.inf)) is not None and d > 0 and d > m["spread"]
    ),
}


def _recompute(claim_id: str) -> Callable[[dict[str, Any]], bool]:
    for key in sorted(RECOMPUTE, key=len, reverse=True):
        if claim_id == key or (key.endswith("-") and claim_id.startswith(key)):
            return RECOMPUTE[key]
    raise AssertionError(f"no verdict rule known for claim {claim_id!r}")


def _has_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return any(_has_number(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_number(x) for x in v)
    return False


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # these tests check the experiments' outputs; the fused kernels have their own tests, and
    # their one-off JIT compilation would dominate a few-second smoke run
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_quick_run_produces_consistent_claims(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    path = registry.run_experiment(
        name, out, quick=True, dataset="digits", log=lambda msg: None, progress=False
    )
    assert path == out
    for f in ("config.json", "metrics.csv", "series.json", "summary.json", "report.md"):
        assert (out / f).is_file(), f
    figures = sorted(out.glob("*.png"))
    assert figures and all(f.name.startswith(name) and f.stat().st_size > 1000 for f in figures)

    run = load_run(out)
    s = run.summary
    assert s["status"] == "complete" and s["experiment"] == name
    assert s["dataset"]["name"] == "digits"
    assert s["config"]["quick"] is True
    assert s["seeds"] and s["arms"]
    assert run.rows and all("arm" in r and "step" in r for r in run.rows)
    claims = run.claims
    assert claims, "an experiment must test at least one claim"
    assert len({c.id for c in claims}) == len(claims)
    for c in claims:
        assert isinstance(c.verdict, bool)
        assert c.statement and c.source and c.details
        assert c.seeds
        assert _has_number(c.measured), f"{c.id}: no measured numbers"
        assert _recompute(c.id)(c.measured) == c.verdict, f"{c.id}: verdict vs {c.measured}"
    report = (out / "report.md").read_text()
    assert all(c.statement in report for c in claims)


def test_dropout_keeps_per_layer_variance_shift(tmp_path: Path) -> None:
    """The train/eval statistics mismatch is stored per BN layer and seed, and dropout before
    BN lowers the variance ratio of the layers it precedes (Li et al.'s variance shift)."""
    out = tmp_path / "dropout"
    registry.run_experiment(
        "dropout",
        out,
        quick=True,
        dataset="digits",
        log=lambda msg: None,
        progress=False,
        sets=["dropout_rates=0,0.5", "hidden=32,32"],
    )
    s = load_run(out).summary
    shift = s["variance_shift"]
    assert set(shift) == {"BN-p0", "BN-p0.5", "BN-last-p0.5"}
    per_seed = shift["BN-p0.5"]
    assert len(per_seed) == len(s["seeds"])
    assert set(per_seed[0]) == {"hidden.0.bn", "hidden.1.bn"}
    # hidden.1.bn follows a dropout of rate 0.5: its eval-time variance is well below the
    # running variance accumulated with dropout on; hidden.0.bn sees the raw input (no dropout)
    assert per_seed[0]["hidden.1.bn"]["var_ratio"] < 0.9
    assert per_seed[0]["hidden.1.bn"]["var_ratio"] < per_seed[0]["hidden.0.bn"]["var_ratio"]
    # the doctor's measurement on every BN arm, before and after its fix (recalibration)
    doc = s["doctor"]
    assert set(doc) == {"BN-p0", "BN-p0.5", "BN-last-p0.5"}
    for entry in doc["BN-p0.5"]:
        assert set(entry) >= {"before", "after", "cured", "remaining"}
        assert isinstance(entry["before"]["output_gap"], float)
        # findings name a BN layer, or "" for the whole model (the output gap)
        layers = {f["layer"] for f in entry["before"]["findings"]}
        assert layers <= {"", "hidden.0.bn", "hidden.1.bn"}
    report = (out / "report.md").read_text()
    assert "The doctor on the BN arms" in report


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    from batchnorm.lab.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key"):
        registry.run_experiment(
            "smoothness", tmp_path / "x", quick=True, dataset="digits", sets=["nope=1"]
        )


# --------------------------------------------------------------------------------------------
# claim verdicts on constructed measurements: each experiment's run() with its training stubbed
# (every part comes from ``make(key)``, through the JSON round trip of RunContext.cached, so
# NaN/inf arrive as null exactly as from a saved part)


class _FakeData:
    num_classes = 10
    num_features = 64
    input_shape = (1, 8, 8)
    split = "test"
    x_train = np.zeros((500, 64))
    y_train = np.zeros(500)
    x_test = np.zeros((100, 64))
    y_test = np.zeros(100)

    def info(self) -> dict[str, Any]:
        return {"name": "fake"}

    def subset(self, **kwargs: Any) -> _FakeData:
        return self

    def validation_split(self, *args: Any, **kwargs: Any) -> _FakeData:
        return self


class _StubCtx:
    progress = False

    def __init__(self, make: Callable[[str], Any]) -> None:
        self.make, self.keys = make, []

    def log(self, msg: str) -> None:
        pass

    def cached(self, key: str, fn: Any) -> Any:
        self.keys.append(key)
        return json.loads(json.dumps(_jsonable(self.make(key))))

    def load_dataset(self, *args: Any, **kwargs: Any) -> _FakeData:
        return _FakeData()


def _stub_run(
    monkeypatch: pytest.MonkeyPatch, module: Any, cfg: Any, make: Callable[[str], Any]
) -> tuple[dict[str, Claim], _StubCtx]:
    monkeypatch.setattr(module, "load_data", lambda *a, **k: _FakeData(), raising=False)
    ctx = _StubCtx(make)
    res = module.run(cfg, ctx)
    return {c.id: c for c in res.summary["claims"]}, ctx


def _train(
    accs: list[float], *, diverged: bool = False, key: str = "test_acc", **cols: list[float]
) -> dict[str, Any]:
    """A saved training run: ``accs`` at steps 0, 20, 40, …; a diverged run ends with a row
    without metrics, as train.train writes it."""
    rows = [
        {"step": 20 * i, key: a, "train_loss": 0.5, **{c: v[i] for c, v in cols.items()}}
        for i, a in enumerate(accs)
    ]
    if diverged:
        rows.append({"step": 20 * len(accs), key: None, "train_loss": None})
    return {
        "rows": rows,
        "diverged": diverged,
        "diverged_step": None,
        "steps_done": 0,
        "seconds": 1,
    }


def test_ranking_helpers_are_the_reference_rule() -> None:
    assert _nets.ranked(0.9, [False, True], -math.inf) == -math.inf
    assert _nets.ranked(0.9, [False, False], -math.inf) == 0.9
    both = _nets.exceeds_spread([None], [None], [True], [True], names=("x", "y"))
    assert both["diff"] is None and both["exceeds"] is False
    assert both["measured"]["diverged"].endswith("(both arms diverged: not supported)")
    # the surviving seed of a partly diverged arm does not win
    one = _nets.exceeds_spread([None, 0.95], [0.9, 0.9], [True, False], [False, False])
    assert one["diff"] == -math.inf and one["exceeds"] is True
    assert one["measured"]["difference"] is None  # no -inf in summary.json
    assert one["measured"]["diverged"] == "a diverged in 1 of 2 seeds (ranks lowest)"
    assert one["measured"]["diverged_seeds"] == {"a": 1, "b": 0}
    # errors: the diverged arm has the largest error
    err = _nets.exceeds_spread([None], [0.1], [True], [False], worst=math.inf)
    assert err["diff"] == math.inf and err["exceeds"] is True
    # one seed: the spread is unknown, and the measured values say so
    single = _nets.exceeds_spread([0.5], [0.4], [False], [False])
    assert (
        single["exceeds"] is True and "unknown with one seed" in single["measured"]["spread_note"]
    )
    assert "unknown with one seed" in _nets.spread_rule(1)
    assert "over 3 seeds" in _nets.spread_rule(3)
    assert (
        "spread_note"
        not in _nets.exceeds_spread([0.5, 0.6], [0.4, 0.4], [0, 0], [0, 0])["measured"]
    )
    # paper-mnist uses the same helpers (one home)
    assert paper_mnist.ranked is _nets.ranked and paper_mnist.diverged_text is _nets.diverged_text


def _placement(before: Callable[[int], dict[str, Any]], after: Callable[[int], dict[str, Any]]):  # type: ignore[no-untyped-def]
    def make(key: str) -> dict[str, Any]:
        _, arm, seed = key.split("-")
        s = int(seed[4:])
        if arm == "none":
            return {"train": _train([0.1, 0.5, 0.7, 0.8]), "extra": {}}
        return {"train": (before if arm == "before" else after)(s), "extra": {}}

    return make


def test_placement_arm_with_a_diverged_seed_ranks_lowest(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = placement.PlacementConfig(seeds=3, activations=("relu",), final_window=1)
    # before diverges in 2 of 3 seeds; its surviving seed ends above after
    make = _placement(
        lambda s: _train([0.1, 0.3], diverged=True) if s < 2 else _train([0.1, 0.9, 0.95]),
        lambda s: _train([0.1, 0.6, 0.85, 0.9]),
    )
    c, _ = _stub_run(monkeypatch, placement, cfg, make)
    assert c["before-better-relu"].verdict is False
    assert c["placement-matters-relu"].verdict is True  # they differ: one trained, one diverged
    m = c["before-better-relu"].measured
    assert m["diverged"] == "before diverged in 2 of 3 seeds (ranks lowest)"
    assert m["before"]["values"] == [None, None, 0.95]  # the mean_std stays descriptive
    # after diverges in every seed: before beats it
    make = _placement(lambda s: _train([0.1, 0.9, 0.95]), lambda s: _train([0.1], diverged=True))
    c, _ = _stub_run(monkeypatch, placement, cfg, make)
    assert c["before-better-relu"].verdict is True and c["placement-matters-relu"].verdict is True
    # both diverged: nothing supported
    make = _placement(
        lambda s: _train([0.1], diverged=True), lambda s: _train([0.1], diverged=True)
    )
    c, _ = _stub_run(monkeypatch, placement, cfg, make)
    assert not c["before-better-relu"].verdict and not c["placement-matters-relu"].verdict
    for claim in c.values():
        assert _recompute(claim.id)(claim.measured) == claim.verdict


def test_placement_diverged_no_bn_is_reached_at_the_first_evaluation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = placement.PlacementConfig(seeds=2, activations=("relu",), final_window=1)

    def make(key: str) -> dict[str, Any]:
        _, arm, seed = key.split("-")
        if arm == "none":
            if seed == "seed0":
                return {"train": _train([0.1, 0.2], diverged=True), "extra": {}}
            return {"train": _train([0.1, 0.5, 0.9, 0.99]), "extra": {}}
        return {"train": _train([0.1, 0.6, 0.8, 0.9]), "extra": {}}

    c, _ = _stub_run(monkeypatch, placement, cfg, make)
    f = c["bn-faster-relu"]
    assert f.verdict is True and f.measured["steps"] == {"none": None, "before": 20, "after": 20}
    assert f.measured["diverged"] == "none diverged in 1 of 2 seeds (ranks lowest)"
    assert _recompute(f.id)(f.measured) is True


def test_placement_states_an_unknown_spread_with_one_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = placement.PlacementConfig(seeds=1, activations=("relu",), final_window=1)
    make = _placement(lambda s: _train([0.1, 0.91]), lambda s: _train([0.1, 0.9]))
    c, _ = _stub_run(monkeypatch, placement, cfg, make)
    claim = c["before-better-relu"]
    assert claim.verdict is True  # any difference passes: kept, but said
    assert "unknown with one seed" in claim.details
    assert "unknown with one seed" in claim.measured["spread_note"]


def _dropout_make(diverged_arms: dict[str, int]) -> Callable[[str], dict[str, Any]]:
    acc = {"noBN-p0": 0.80, "noBN-p0.5": 0.84, "BN-p0": 0.85, "BN-p0.5": 0.86, "BN-last-p0.5": 0.88}

    def make(key: str) -> dict[str, Any]:
        name, seed = key.rsplit("-seed", 1)
        mm = (
            {
                f"hidden.{k}.bn": {"var_ratio": 0.6 if name.startswith("BN-p") else 1.0}
                for k in (0, 1)
            }
            if name.startswith("BN")
            else {}
        )
        if int(seed) < diverged_arms.get(name, 0):
            return {
                "train": _train([0.1, 0.1], diverged=True, train_acc=[0.1, 0.1]),
                "extra": {"mismatch": {}},
            }
        return {
            "train": _train([0.1, acc[name]], train_acc=[0.1, 0.99], val_acc=[0.1, acc[name]]),
            "extra": {"mismatch": mm},
        }

    return make


def test_dropout_arm_with_a_diverged_seed_ranks_lowest(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dropout.DropoutConfig(
        seeds=2, final_window=1, hidden=(32, 32), dropout_rates=(0.0, 0.5), n_train=300, n_val=100
    )
    c, _ = _stub_run(monkeypatch, dropout, cfg, _dropout_make({"BN-last-p0.5": 1}))
    hurt = c["variance-shift-hurts"]
    assert hurt.verdict is False  # its surviving seed (0.88) would have beaten 0.86
    assert hurt.measured["diverged"] == "BN-last-p0.5 diverged in 1 of 2 seeds (ranks lowest)"
    assert "supported if after-last - before > spread" in hurt.details
    # the arms differ in the amount of dropout too: the shift's own share is reported apart
    assert "one dropout layer instead of one per hidden block" in hurt.statement
    assert hurt.measured["recalibration_gain"] == {"shift_arm": None, "safe_arm": None}
    runs = [
        {"extra": {"doctor": {"test_acc_before": 0.80, "test_acc_after": 0.83}}},
        {"extra": {"doctor": {"test_acc_before": 0.70, "test_acc_after": 0.71}}},
        {"extra": {}},
    ]
    assert dropout._recalibration_gain(runs) == pytest.approx(0.02)
    assert "supported if BN's gap < no-BN's gap" in c["bn-regularizes"].details
    # no-BN without dropout diverged: its gap is +inf, so BN regularizes; dropout's benefit
    # without BN is +inf, so BN reduces it
    c, _ = _stub_run(monkeypatch, dropout, cfg, _dropout_make({"noBN-p0": 1}))
    assert c["bn-regularizes"].verdict is True
    assert c["bn-reduces-dropout-benefit"].verdict is True
    assert c["bn-reduces-dropout-benefit"].measured["benefit_without_BN"] is None
    # both arms compared diverged: not supported
    c, _ = _stub_run(monkeypatch, dropout, cfg, _dropout_make({"noBN-p0": 1, "BN-p0": 2}))
    assert c["bn-regularizes"].verdict is False
    assert "not supported" in c["bn-regularizes"].measured["diverged"]
    for claim in c.values():
        assert _recompute(claim.id)(claim.measured) == claim.verdict


def test_dropout_rate_is_chosen_on_the_validation_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rate whose benefit is judged is the one with the best validation accuracy, not the
    best test accuracy (choosing by test accuracy inflated both benefits)."""
    test = {"noBN-p0": 0.80, "noBN-p0.2": 0.81, "noBN-p0.5": 0.86, "BN-p0": 0.85,
            "BN-p0.2": 0.87, "BN-p0.5": 0.84, "BN-last-p0.2": 0.8, "BN-last-p0.5": 0.8}  # fmt: skip
    val = dict(test, **{"noBN-p0.2": 0.90, "noBN-p0.5": 0.82})  # no-BN's best on validation: 0.2

    def make(key: str) -> dict[str, Any]:
        name = key.rsplit("-seed", 1)[0]
        return {"train": _train([0.1, test[name]], train_acc=[0.1, 0.9], val_acc=[0.1, val[name]]),
                "extra": {"mismatch": {}}}  # fmt: skip

    cfg = dropout.DropoutConfig(
        seeds=1, final_window=1, hidden=(32, 32), dropout_rates=(0.0, 0.2, 0.5), n_train=300,
        n_val=100,
    )  # fmt: skip
    c, _ = _stub_run(monkeypatch, dropout, cfg, make)
    claim = c["bn-reduces-dropout-benefit"]
    assert claim.measured["chosen"] == {"noBN": "noBN-p0.2", "BN": "BN-p0.2"}
    # no-BN's benefit is 0.01 (at 0.2), not 0.06 (at 0.5, the best test accuracy): BN's 0.02
    # is larger, so BN does not reduce it here
    assert claim.measured["benefit_without_BN"] == pytest.approx(0.01)
    assert claim.verdict is False
    assert _recompute(claim.id)(claim.measured) is False
    # a tie on the validation images goes to the smaller rate (the names used to be compared:
    # "p0.5" beat "p0.2", and "p1e-05" beat "p0.5")
    val.update({"noBN-p0.2": 0.9, "noBN-p0.5": 0.9, "BN-p0.2": 0.9, "BN-p0.5": 0.9})
    c, _ = _stub_run(monkeypatch, dropout, cfg, make)
    assert c["bn-reduces-dropout-benefit"].measured["chosen"] == {
        "noBN": "noBN-p0.2",
        "BN": "BN-p0.2",
    }
    with pytest.raises(ConfigError, match="n_val"):
        dropout._split(dropout.DropoutConfig(n_train=450, n_val=100), _FakeData())  # type: ignore[arg-type]


def test_dropout_and_init_part_names_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dropout.DropoutConfig(
        seeds=1,
        final_window=1,
        hidden=(32, 32),
        dropout_rates=(0.0, 0.5, 0.5000001),
        n_train=300,
        n_val=100,
    )
    acc = {"p0": 0.8, "p0.5": 0.84, "p0.5000001": 0.85}

    def make(key: str) -> dict[str, Any]:
        name = key.rsplit("-seed", 1)[0]
        a = acc[name.rsplit("-", 1)[1]]
        return {"train": _train([0.1, a], train_acc=[0.1, 0.9], val_acc=[0.1, a]),
                "extra": {"mismatch": {}}}  # fmt: skip

    _, ctx = _stub_run(monkeypatch, dropout, cfg, make)
    assert {"noBN-p0-seed0", "BN-p0.5-seed0", "BN-p0.5000001-seed0"} <= set(ctx.keys)
    assert len(ctx.keys) == len(set(ctx.keys)) == 8
    cfg2 = initialization.InitializationConfig(seeds=1, init_scales=(0.001, 10.0, 10.000001))
    _, ctx = _stub_run(
        monkeypatch, initialization, cfg2, lambda key: {"train": _train([0.1, 0.9]), "extra": {}}
    )
    assert {"noBN-init0.001-seed0", "BN-init10-seed0", "BN-init10.000001-seed0"} <= set(ctx.keys)
    assert len(set(ctx.keys)) == 6
    assert [_nets.exact_key(x) for x in (0.0, 0.5, 1e-5, 10.0)] == ["0", "0.5", "1e-05", "10"]


def _noisy_make(diverged_arms: set[str]) -> Callable[[str], dict[str, Any]]:
    def extra(d: float) -> dict[str, Any]:
        return {
            "layer": "x",
            "probe_steps": [0, 20],
            "drift": {"normalized_mean_shift": [d], "log_std_ratio": [d]},
            "quantiles_unit0": [[0, 0, 0], [0, 0, 0]],
        }

    acc = {"standard": 0.80, "BN": 0.90, "noisy-BN": 0.90, "standard+noise": 0.6}
    drift = {"standard": 0.6, "BN": 0.1, "noisy-BN": 0.5, "standard+noise": 0.5}

    def make(key: str) -> dict[str, Any]:
        arm, seed = key.rsplit("-seed", 1)
        if arm in diverged_arms and seed == "0":
            return {"train": _train([0.1, 0.2], diverged=True), "extra": extra(math.nan)}
        return {"train": _train([0.1, acc[arm]]), "extra": extra(drift[arm])}

    return make


def test_noisy_bn_differences_within_the_seed_spread_decide_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """noisy BN 0.02 above the standard network and 0.05 more drift, with seeds that differ by
    0.1 (spread 0.2 per comparison): neither claim is supported (both were before)."""

    def make(key: str) -> dict[str, Any]:
        arm, seed = key.rsplit("-seed", 1)
        noise = 0.05 if seed == "0" else -0.05
        acc = {"standard": 0.80, "BN": 0.90, "noisy-BN": 0.82, "standard+noise": 0.6}[arm]
        drift = {"standard": 0.5, "BN": 0.1, "noisy-BN": 0.55, "standard+noise": 0.5}[arm]
        return {
            "train": _train([0.1, acc + noise]),
            "extra": {
                "layer": "x",
                "probe_steps": [0, 20],
                "drift": {"normalized_mean_shift": [drift + noise], "log_std_ratio": [0.1]},
                "quantiles_unit0": [[0, 0, 0], [0, 0, 0]],
            },
        }

    cfg = noisy_bn.NoisyBNConfig(seeds=2, final_window=1)
    c, _ = _stub_run(monkeypatch, noisy_bn, cfg, make)
    assert c["noisy-bn-beats-standard"].verdict is False
    assert c["noisy-bn-less-stable"].verdict is False
    assert c["noisy-bn-beats-standard"].measured["spread"] == pytest.approx(0.1)
    for claim in c.values():
        assert _recompute(claim.id)(claim.measured) == claim.verdict


def test_noisy_bn_arm_with_a_diverged_seed_ranks_lowest(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = noisy_bn.NoisyBNConfig(seeds=2, final_window=1)
    c, _ = _stub_run(monkeypatch, noisy_bn, cfg, _noisy_make({"noisy-BN"}))
    assert c["noisy-bn-as-good-as-bn"].verdict is False
    assert c["noisy-bn-beats-standard"].verdict is False
    assert c["noisy-bn-less-stable"].verdict is True  # a diverged arm's drift is +inf
    assert "noisy-BN diverged in 1 of 2 seeds" in c["noisy-bn-as-good-as-bn"].measured["diverged"]
    assert "supported if noisy-BN's drift - the standard network's > spread" in (
        c["noisy-bn-less-stable"].details
    )
    # a standard network with one diverged seed counts as beaten (and as the larger drift)
    c, _ = _stub_run(monkeypatch, noisy_bn, cfg, _noisy_make({"standard"}))
    assert c["noisy-bn-beats-standard"].verdict is True
    assert c["noisy-bn-less-stable"].verdict is False
    c, _ = _stub_run(monkeypatch, noisy_bn, cfg, _noisy_make({"standard", "noisy-BN"}))
    assert not c["noisy-bn-beats-standard"].verdict and not c["noisy-bn-less-stable"].verdict
    for claim in c.values():
        assert _recompute(claim.id)(claim.measured) == claim.verdict


def test_smoothness_infinite_probe_of_a_diverged_run_counts_as_largest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def probe(step: int, v: float) -> dict[str, Any]:
        return {k: v for k in smoothness.MEASURES} | {"step": step}

    def make(key: str) -> dict[str, Any]:
        if key.startswith("noBN"):
            return {
                "train": _train([0.1, 0.3], diverged=True),
                "extra": {"probes": [probe(20, 0.5), probe(40, math.inf)]},
            }
        return {"train": _train([0.1, 0.8, 0.9]), "extra": {"probes": [probe(20, 1.0)] * 2}}

    c, _ = _stub_run(monkeypatch, smoothness, smoothness.SmoothnessConfig(seeds=1), make)
    assert all(claim.verdict for claim in c.values()), c
    for claim in c.values():
        assert claim.measured["diverged_seeds"] == {"noBN": 1, "BN": 0}
        assert _recompute(claim.id)(claim.measured) is True


def test_ics_diverged_arm_has_the_largest_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(key: str) -> dict[str, Any]:
        net, arm, _ = key.split("-")
        cos = 0.9 if arm == "BN" else 0.5  # BN's shift (1 - cos) is the smaller one...
        # the first layer's shift is 0 by definition (cos 1): left out of the means
        probes = [{"step": 20, "cosine": [1.0, cos], "relative_l2": [0.0, 0.1],
                   "l2": [0.0, 0.1]}]  # fmt: skip
        # ...but BN diverged in the cnn: its shift ranks as +inf, so BN does not reduce it
        return {"train": _train([0.1, 0.5], diverged=arm == "BN" and net == "cnn"),
                "extra": {"probes": probes}}  # fmt: skip

    c, _ = _stub_run(monkeypatch, ics, ics.ICSConfig(seeds=1), make)
    assert c["bn-does-not-reduce-ics-cnn"].verdict is True
    assert c["bn-does-not-reduce-ics-dln"].verdict is False
    assert (
        c["bn-does-not-reduce-ics-cnn"]
        .measured["diverged"]
        .startswith("BN diverged or had a non-finite probe in 1")
    )
    for claim in c.values():
        assert _recompute(claim.id)(claim.measured) == claim.verdict


def test_ics_probe_that_overflowed_counts_as_the_largest_shift(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A probe where G' overflowed (cosine NaN, relative ℓ2 inf, as internal_covariate_shift
    reports it) in a run that did not diverge: the arm's shift is unbounded there, +inf, as in
    smoothness; left out of the mean, the arm that blew up looked less shifted."""

    def make(key: str) -> dict[str, Any]:
        _, arm, _ = key.split("-")
        if arm == "noBN":  # a moderate shift at the first probe, an overflow at the second
            cos, rel = [0.9, math.nan], [0.5, math.inf]
        else:
            cos, rel = [0.8, 0.8], [0.6, 0.6]
        probes = [
            {"step": s, "cosine": [1.0, c], "relative_l2": [0.0, r], "l2": [0.0, r]}
            for s, c, r in zip((20, 40), cos, rel)
        ]
        return {"train": _train([0.1, 0.5]), "extra": {"probes": probes}}

    c, _ = _stub_run(monkeypatch, ics, ics.ICSConfig(seeds=2), make)
    for claim in c.values():
        assert claim.verdict is False  # no-BN's shift is +inf: BN reduces it
        assert claim.measured["diverged_seeds"] == {"noBN": 2, "BN": 0}
        assert "non-finite probe" in claim.measured["diverged"]
        assert _recompute(claim.id)(claim.measured) is False


def test_ics_and_smoothness_need_differences_beyond_the_seed_spread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two seeds: a BN advantage smaller than the seed-to-seed spread decides nothing (it did
    before: any difference of the seed-means counted); one larger than the spread does."""

    def ics_make(gap: float) -> Callable[[str], dict[str, Any]]:
        def make(key: str) -> dict[str, Any]:
            _, arm, seed = key.split("-")
            noise = 0.1 if seed == "seed0" else -0.1  # spread 0.2 (std 0.1 per arm)
            shift = 0.5 + noise - (gap if arm == "BN" else 0.0)
            probes = [{"step": 20, "cosine": [1.0, 1 - shift], "relative_l2": [0.0, shift],
                       "l2": [0.0, shift]}]  # fmt: skip
            return {"train": _train([0.1, 0.5]), "extra": {"probes": probes}}

        return make

    cfg = ics.ICSConfig(seeds=2)
    c, _ = _stub_run(monkeypatch, ics, cfg, ics_make(0.15))  # BN smaller, within the spread
    assert c["bn-does-not-reduce-ics-cnn"].verdict is True
    c, _ = _stub_run(monkeypatch, ics, cfg, ics_make(0.3))  # BN smaller beyond the spread
    assert c["bn-does-not-reduce-ics-cnn"].verdict is False
    assert c["bn-does-not-reduce-ics-cnn"].measured["spread_one_minus_cos"] == pytest.approx(0.2)
    for claim in c.values():
        assert _recompute(claim.id)(claim.measured) == claim.verdict

    def smooth_make(gap: float) -> Callable[[str], dict[str, Any]]:
        def make(key: str) -> dict[str, Any]:
            arm, seed = key.split("-")
            v = 1.0 + (0.1 if seed == "seed0" else -0.1) - (gap if arm == "BN" else 0.0)
            probes = [{k: v for k in smoothness.MEASURES} | {"step": 20}]
            return {"train": _train([0.1, 0.5]), "extra": {"probes": probes}}

        return make

    cfg_s = smoothness.SmoothnessConfig(seeds=2)
    c, _ = _stub_run(monkeypatch, smoothness, cfg_s, smooth_make(0.15))
    assert not any(claim.verdict for claim in c.values())
    c, _ = _stub_run(monkeypatch, smoothness, cfg_s, smooth_make(0.3))
    assert all(claim.verdict for claim in c.values())
    for claim in c.values():
        assert _recompute(claim.id)(claim.measured) == claim.verdict


def test_ics_and_smoothness_probe_before_the_update() -> None:
    """The probes see the weights the batch's gradient was taken at (Santurkar et al.'s
    definitions), not the weights after the step on that batch."""
    seen: list[tuple[int, float, float]] = []
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def before(info: Any) -> None:
        seen.append((info.step, float(model.weight.detach().sum()), float(model.weight.grad.sum())))

    def after(info: Any) -> None:
        step, w_before, g = seen[-1]
        assert info.step == step
        assert float(model.weight.detach().sum()) == pytest.approx(w_before - 0.5 * g, abs=1e-5)

    lab_train.train(model, opt, x, y, steps=3, batch_size=4, eval_every=10,
                    before_step=[before], callbacks=[after], progress=False)  # fmt: skip
    assert [s for s, _, _ in seen] == [1, 2, 3]


@pytest.mark.parametrize("module", [ics, smoothness], ids=["ics", "smoothness"])
def test_the_landscape_experiments_probe_through_before_step(
    module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks: dict[str, Any] = {}
    real = lab_train.train

    def spy(*args: Any, **kw: Any) -> Any:
        hooks.update(before=list(kw.get("before_step", ())), after=list(kw.get("callbacks", ())))
        kw["steps"] = 0
        return real(*args, **kw)

    monkeypatch.setattr(module.train, "train", spy)
    if module is ics:
        ics._train(ics.ICSConfig(dln_samples=64), None, "dln", True, 0, False)
    else:
        x = torch.zeros(120, 1, 8, 8)
        y = torch.zeros(120, dtype=torch.long)
        data = SimpleNamespace(input_shape=(1, 8, 8), num_classes=10, x_train=x, y_train=y,
                               x_test=x, y_test=y)  # fmt: skip
        smoothness._train(smoothness.SmoothnessConfig(), data, True, 0, False)  # type: ignore[arg-type]
    assert len(hooks["before"]) == 1 and hooks["after"] == []


def test_initialization_scales_the_hidden_layers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """BN's scale invariance covers the layers BN follows; the classifier keeps its default
    initialization in both arms (scaling it made BN 'fail' at std 10 on the classifier alone)."""
    nets: list[torch.nn.Module] = []

    def spy(net: torch.nn.Module, *args: Any, **kw: Any) -> Any:
        nets.append(net)
        return lab_train.TrainResult([])

    monkeypatch.setattr(initialization.train, "train", spy)
    data = SimpleNamespace(num_features=64, num_classes=10, x_train=None, y_train=None,
                           x_test=None, y_test=None)  # fmt: skip
    cfg = initialization.InitializationConfig()
    for bn in (False, True):
        initialization._train(cfg, data, bn, 10.0, 0, False)  # type: ignore[arg-type]
    for net in nets:
        assert all(float(b.linear.weight.detach().std()) > 5 for b in net.hidden)  # type: ignore[union-attr]
        assert float(net.out.weight.detach().std()) < 0.2  # type: ignore[union-attr, arg-type]


def test_initialization_scale_with_any_diverged_seed_counts_as_chance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = initialization.InitializationConfig(
        seeds=2, init_scales=(0.001, 0.1, 10.0), final_window=1
    )
    acc = {"noBN": {"0.001": 0.85, "0.1": 0.90, "10": 0.88}, "BN": {"0.001": 0.80, "0.1": 0.90, "10": 0.85}}  # fmt: skip

    def make(key: str) -> dict[str, Any]:
        arm, scale, seed = key.split("-")
        if arm == "noBN" and scale == "init10" and seed == "seed0":  # 1 of 2 seeds diverges
            return {"train": _train([0.1, 0.1], diverged=True), "extra": {}}
        return {"train": _train([0.1, acc[arm][scale[4:]]]), "extra": {}}

    c, _ = _stub_run(monkeypatch, initialization, cfg, make)
    ins = c["bn-init-insensitive"]
    assert ins.measured["range_noBN"] == pytest.approx(0.90 - 0.10)  # 10 counts as chance
    assert ins.measured["diverged_scales_noBN"] == ["10"]
    assert ins.verdict is True
    assert c["bn-init-fewer-failures"].measured["status_noBN"]["10"] == "diverged"


def test_initialization_an_arm_failing_at_every_scale_is_not_insensitive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A range of 0 from failing alike everywhere is no insensitivity; and the best arm at
    0.26 against chance 0.1 has not "trained" merely for being the best."""
    cfg = initialization.InitializationConfig(
        seeds=1, init_scales=(0.001, 0.1, 10.0), final_window=1
    )
    acc = {"noBN": {"0.001": 0.1, "0.1": 0.9, "10": 0.1}, "BN": {"0.001": 0.1, "0.1": 0.1, "10": 0.1}}  # fmt: skip

    def make(key: str) -> dict[str, Any]:
        arm, scale, _ = key.split("-")
        if arm == "BN":
            return {"train": _train([0.1, 0.1], diverged=True), "extra": {}}
        return {"train": _train([0.1, acc[arm][scale[4:]]]), "extra": {}}

    c, _ = _stub_run(monkeypatch, initialization, cfg, make)
    ins = c["bn-init-insensitive"]
    assert ins.measured["range_BN"] == 0.0 and ins.measured["trained_scales_BN"] == 0
    assert ins.verdict is False

    def finals(acc: dict[str, dict[str, float]]) -> Callable[[str], dict[str, Any]]:
        # each arm and scale trains from chance to its final accuracy in ``acc``
        def make(key: str) -> dict[str, Any]:
            arm, scale, _ = key.split("-")
            return {"train": _train([0.1, acc[arm][scale[4:]]]), "extra": {}}

        return make

    low = {"noBN": {"0.001": 0.1, "0.1": 0.1, "10": 0.1}, "BN": {"0.001": 0.1, "0.1": 0.26, "10": 0.1}}  # fmt: skip
    c, _ = _stub_run(monkeypatch, initialization, cfg, finals(low))
    fewer = c["bn-init-fewer-failures"]
    assert fewer.measured["status_BN"]["0.1"] == "stalled" and fewer.verdict is False

    # the other way round: no-BN failing at every scale is not insensitive either, and BN
    # trained at every scale (range 0.06 > 0) is the less sensitive arm
    flip = {"noBN": {"0.001": 0.1, "0.1": 0.1, "10": 0.1}, "BN": {"0.001": 0.8, "0.1": 0.86, "10": 0.82}}  # fmt: skip
    c, _ = _stub_run(monkeypatch, initialization, cfg, finals(flip))
    ins = c["bn-init-insensitive"]
    assert ins.measured["range_noBN"] == 0.0 and ins.measured["trained_scales_noBN"] == 0
    assert ins.measured["trained_scales_BN"] == 3 and ins.verdict is True


def test_learning_rate_stable_is_judged_against_each_arms_own_best(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No-BN learning more slowly than BN (0.32 at its best rate, where BN reaches 0.9) is not
    unstable there: the largest stable rates compare where each arm still works."""
    sweep = {"noBN": [0.25, 0.32, 0.13], "BN": [0.6, 0.9, 0.1]}

    def make(key: str) -> dict[str, Any]:
        if key.startswith("sweep-"):
            arm, lr = key[6:].split("-lr")
            k = {"0.01": 0, "0.1": 1, "1": 2}[lr]
            return {"train": _train([0.1, sweep[arm][k]], key="val_acc"), "extra": {}}
        return {"train": _train([0.1, 0.5, 0.8], val_acc=[0.1, 0.5, 0.8]), "extra": {}}

    cfg = learning_rate.LearningRateConfig(seeds=1, sweep_lrs=(0.01, 0.1, 1.0))
    c, _ = _stub_run(monkeypatch, learning_rate, cfg, make)
    stable = c["bn-larger-stable-lr"]
    assert stable.measured["largest_stable_lr_noBN"] == 0.1
    assert stable.measured["largest_stable_lr_BN"] == 0.1
    assert stable.verdict is False  # the old bar (BN's 0.9 for both) said no-BN had none


def _learning_rate_arms(
    curves: dict[str, list[float]], diverged_early: tuple[str, str] | None = None
) -> Callable[[str], dict[str, Any]]:
    """Saved runs of the learning-rate experiment: every sweep run at 0.5, each arm's test and
    validation accuracy at steps 0, 20, … from ``curves``; ``diverged_early`` (arm, seed) ends
    with a non-finite loss before its first evaluation."""

    def make(key: str) -> dict[str, Any]:
        if key.startswith("sweep-"):
            return {"train": _train([0.1, 0.5], key="val_acc"), "extra": {}}
        arm, seed = key[4:].rsplit("-seed", 1)
        if (arm, seed) == diverged_early:
            return {"train": _train([0.1], diverged=True, val_acc=[0.1]), "extra": {}}
        acc = curves[arm]
        return {"train": _train(acc, val_acc=acc), "extra": {}}

    return make


def test_learning_rate_target_excludes_step_0(monkeypatch: pytest.MonkeyPatch) -> None:
    curves = {
        "noBN": [0.12, 0.10, 0.11, 0.11],  # never improves on its untrained accuracy
        "BN-Baseline": [0.10, 0.50, 0.80, 0.90],
        "BN-x5": [0.10, 0.6, 0.85, 0.9],
        "BN-x30": [0.1, 0.5, 0.7, 0.8],
        "BN-x5-Sigmoid": [0.1, 0.4, 0.6, 0.7],
        "noBN-x5": [0.1, 0.1, 0.1, 0.1],
        "noBN-Sigmoid": [0.1, 0.1, 0.1, 0.1],
    }
    cfg = learning_rate.LearningRateConfig(seeds=1, sweep_lrs=(0.01, 0.1, 1.0))
    c, _ = _stub_run(monkeypatch, learning_rate, cfg, _learning_rate_arms(curves))
    fast = c["bn-trains-faster"]
    assert fast.measured["target_accuracy"] == 0.11  # not the untrained 0.12
    assert fast.measured["noBN_steps"] == 40 and fast.measured["BN-Baseline_steps"] == 20
    assert fast.verdict is True and c["bn-x5-14x-fewer-steps"].verdict is True
    # halfway to a target at chance is chance itself: the floor (a quarter of the way to 1)
    assert c["nobn-x5-diverges"].measured["learn_threshold"] == pytest.approx(0.1 + 0.25 * 0.9)
    for claim in c.values():
        assert _recompute(claim.id)(claim.measured) == claim.verdict


def test_learning_rate_target_comes_from_the_no_bn_seeds_that_were_evaluated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A no-BN seed diverging before its first evaluation left every step of the seed-mean
    curve empty, and the target fell back to an accuracy of 1.0 that nothing reaches: BN,
    reaching the surviving seeds' best far sooner, was judged not faster."""
    curves = {
        "noBN": [0.1, 0.3, 0.5, 0.7],
        "BN-Baseline": [0.1, 0.75, 0.8, 0.85],
        "BN-x5": [0.1, 0.8, 0.85, 0.9],
        "BN-x30": [0.1, 0.7, 0.8, 0.85],
        "BN-x5-Sigmoid": [0.1, 0.5, 0.6, 0.7],
        "noBN-x5": [0.1, 0.1, 0.1, 0.1],
        "noBN-Sigmoid": [0.1, 0.1, 0.1, 0.1],
    }
    # no-BN's seed 1: non-finite before step 20, its first evaluation
    make = _learning_rate_arms(curves, diverged_early=("noBN", "1"))
    cfg = learning_rate.LearningRateConfig(seeds=2, sweep_lrs=(0.01, 0.1, 1.0))
    c, _ = _stub_run(monkeypatch, learning_rate, cfg, make)
    fast = c["bn-trains-faster"]
    assert fast.measured["target_accuracy"] == 0.7 and fast.measured["target_step"] == 60
    assert fast.measured["steps_per_seed"]["BN-Baseline"] == [20, 20]
    assert fast.verdict is True
    for claim in c.values():
        assert _recompute(claim.id)(claim.measured) == claim.verdict
