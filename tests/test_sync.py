"""Synchronized BN: real gloo process groups on 127.0.0.1 against single-process BN on the
concatenated batch (torch.nn.functional.batch_norm as the oracle), plus the failure modes.

Each launch spawns one process group and runs several checks in it (spawning is the slow part);
workers save what they computed, and the oracle comparisons run here, in the test process.
Every launch has a deadline and every process group a short timeout, so no test can hang.
"""

from __future__ import annotations

import copy
import datetime
import math
import multiprocessing
import os
import socket
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm
from batchnorm.functional import NonFiniteStatisticsWarning
from batchnorm.sync import (
    SyncBatchNorm,
    all_reduce_population_stats,
    convert_sync_batchnorm,
    merge_stats,
)

# what the fork server imports once for all replicas (DistributedDataParallel imports dynamo,
# which takes seconds)
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "batchnorm.sync"]
TOL = 1e-10
PG_TIMEOUT = 10.0  # seconds: bounds every collective in the workers


# --------------------------------------------------------------------------------------------
# launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    # plain-torch eval path: no kernel compilation in short-lived processes
    os.environ["BATCHNORM_BACKEND"] = "torch"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _start(entry: Callable[..., None], world: int, args: tuple, deadline: float) -> None:
    """Run ``entry(rank, *args)`` on ``world`` fresh processes; fail past ``deadline`` seconds.

    The processes come from a fork server that imported torch once (per test process), so each
    launch costs a fork, not a torch import; they share no state with this process.
    """
    multiprocessing.set_forkserver_preload(_PRELOAD)
    ctx = mp.start_processes(entry, args=args, nprocs=world, join=False, start_method="forkserver")
    end = time.monotonic() + deadline
    while not ctx.join(timeout=0.2):  # re-raises a worker's exception with its traceback
        if time.monotonic() > end:
            for p in ctx.processes:  # the processes this test started
                p.kill()
            pytest.fail(f"{world} processes did not finish within {deadline} s")


def launch(fn: Callable[..., None], world: int, *args: Any, deadline: float = 120.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks of a fresh process group."""
    _start(_entry, world, (world, _free_port(), fn, args), deadline)


def _save(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# exactness: cases shared by workers (which compute) and the test (which checks)

# (name, per-sample shape, axis, per-rank batch sizes, momentum)
CASES: dict[int, list[tuple[str, tuple[int, ...], int, list[int], float | None]]] = {
    2: [
        ("uneven-4d", (4, 3, 3), 1, [5, 3], 0.1),
        ("empty-rank-3d", (3, 5), 1, [6, 0], 0.1),
        ("axis-last", (5, 6), -1, [3, 4], None),
    ],
    3: [
        ("empty-middle-4d", (3, 2, 2), 1, [2, 0, 5], 0.3),
        ("one-sample-each-2d", (7,), 1, [1, 1, 1], 0.1),
        ("axis-last-uneven", (2, 5), -1, [4, 3, 2], None),
    ],
}
STEPS = 2


def _case_data(name: str, shape: tuple[int, ...], axis: int, total: int, step: int) -> dict:
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
    c = shape[axis] if axis < 0 else shape[axis - 1]
    x = torch.randn(total, *shape, generator=g, dtype=torch.float64) * 3 + 1.5
    dy = torch.randn(total, *shape, generator=g, dtype=torch.float64)
    gw = torch.Generator().manual_seed(len(name))
    weight = torch.rand(c, generator=gw, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=gw, dtype=torch.float64)
    return {"x": x, "dy": dy, "weight": weight, "bias": bias, "c": c}


def _slice(t: torch.Tensor, splits: list[int], rank: int) -> torch.Tensor:
    start = sum(splits[:rank])
    return t[start : start + splits[rank]]


def _exact_worker(rank: int, world: int, out: Path) -> None:
    results = {}
    for name, shape, axis, splits, momentum in CASES[world]:
        total = sum(splits)
        d0 = _case_data(name, shape, axis, total, 0)
        bn = SyncBatchNorm(d0["c"], axis=axis, momentum=momentum, dtype=torch.float64)
        with torch.no_grad():
            bn.weight.copy_(d0["weight"])
            bn.bias.copy_(d0["bias"])
        steps = []
        for step in range(STEPS):
            d = _case_data(name, shape, axis, total, step)
            x = _slice(d["x"], splits, rank).clone().requires_grad_(True)
            y = bn(x)
            y.backward(_slice(d["dy"], splits, rank))
            steps.append(
                {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad}
            )
            bn.weight.grad = None
            bn.bias.grad = None
        bn.eval()
        d = _case_data(name, shape, axis, total, 0)
        steps.append({"eval": bn(_slice(d["x"], splits, rank)).detach()})
        results[name] = {
            "steps": steps,
            "state": {k: v.clone() for k, v in bn.state_dict().items()},
        }
    _save(out / f"exact{rank}.pt", results)


def _reference(name: str, shape: tuple[int, ...], axis: int, total: int, momentum: float | None):
    """torch.nn.functional.batch_norm on the concatenated batch, channels moved to axis 1."""
    d0 = _case_data(name, shape, axis, total, 0)
    c = d0["c"]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    steps = []
    for step in range(STEPS):
        d = _case_data(name, shape, axis, total, step)
        x = d["x"].clone().requires_grad_(True)
        w = d0["weight"].clone().requires_grad_(True)
        b = d0["bias"].clone().requires_grad_(True)
        mom = momentum if momentum is not None else 1.0 / (step + 1)  # cumulative average
        y = TF.batch_norm(x.movedim(axis, 1), rm, rv, w, b, True, mom, 1e-5).movedim(1, axis)
        y.backward(d["dy"])
        steps.append({"y": y.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad})
    y_eval = TF.batch_norm(
        d0["x"].movedim(axis, 1), rm, rv, d0["weight"], d0["bias"], False, 0.0, 1e-5
    ).movedim(1, axis)
    steps.append({"eval": y_eval})
    return steps, rm, rv


def _check_exact(world: int, out: Path) -> None:
    ranks = [torch.load(out / f"exact{r}.pt") for r in range(world)]
    for name, shape, axis, splits, momentum in CASES[world]:
        ref_steps, rm, rv = _reference(name, shape, axis, sum(splits), momentum)
        for step in range(STEPS):
            ref = ref_steps[step]
            got = [ranks[r][name]["steps"][step] for r in range(world)]
            for key in ("y", "dx"):
                cat = torch.cat([g[key] for g in got])
                assert cat.shape == ref[key].shape, (name, key)
                assert torch.allclose(cat, ref[key], rtol=0, atol=TOL), (name, step, key)
            for key in ("dw", "db"):  # summed over ranks, as DistributedDataParallel reduces
                summed = sum(g[key] for g in got)
                assert torch.allclose(summed, ref[key], rtol=0, atol=TOL), (name, step, key)
        cat_eval = torch.cat([ranks[r][name]["steps"][STEPS]["eval"] for r in range(world)])
        assert torch.allclose(cat_eval, ref_steps[STEPS]["eval"], rtol=0, atol=TOL), name
        for r in range(world):
            state = ranks[r][name]["state"]
            assert torch.allclose(state["running_mean"], rm, rtol=0, atol=TOL), (name, r)
            assert torch.allclose(state["running_var"], rv, rtol=0, atol=TOL), (name, r)
            assert int(state["num_batches_tracked"]) == STEPS
            # identical on every rank, bit for bit: every rank merges the same messages
            assert torch.equal(state["running_var"], ranks[0][name]["state"]["running_var"])
        for r, n in enumerate(splits):
            if n == 0:  # an empty slice: empty output and gradient
                assert ranks[r][name]["steps"][0]["y"].numel() == 0
                assert ranks[r][name]["steps"][0]["dx"].shape == (0, *shape)


# --------------------------------------------------------------------------------------------
# DistributedDataParallel, process subgroups, population statistics


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    ).double()


DDP_SPLITS = [3, 5]


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = sum(DDP_SPLITS)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(
        n, 3, generator=g, dtype=torch.float64
    )


def _ddp_part(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(convert_sync_batchnorm(_net(seed=3)))
    x, g = _ddp_data()
    (model(_slice(x, DDP_SPLITS, rank)) * _slice(g, DDP_SPLITS, rank)).sum().backward()
    bn = model.module[1]
    return {
        "type": type(bn).__name__,
        "grads": {k: p.grad.clone() for k, p in model.module.named_parameters()},
        "running": (bn.running_mean.clone(), bn.running_var.clone()),
    }


def _check_ddp(results: list[dict], world: int) -> None:
    ref = _net(seed=3)
    x, g = _ddp_data()
    (ref(x) * g).sum().backward()
    for r, res in enumerate(results):
        assert res["type"] == "SyncBatchNorm"
        for k, p in ref.named_parameters():
            # DistributedDataParallel averages gradients over ranks; the sum-loss reference
            # is their sum
            assert torch.allclose(res["grads"][k] * world, p.grad, rtol=0, atol=TOL), (r, k)
        assert torch.allclose(res["running"][0], ref[1].running_mean, rtol=0, atol=TOL)
        assert torch.allclose(res["running"][1], ref[1].running_var, rtol=0, atol=TOL)
        assert torch.equal(res["running"][1], results[0]["running"][1])


POP_COUNTS = {"a": [5, 0, 7], "b": [0, 0, 4]}  # per rank; layer "b" seen by rank 2 only


def _pop_data(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(sum(POP_COUNTS[name]), 3, generator=g, dtype=torch.float64) * 2 + 1


def _population_part(rank: int, world: int) -> dict:
    local = {}
    for name, counts in POP_COUNTS.items():
        if counts[rank]:
            x = _slice(_pop_data(name), counts, rank)
            mean = x.mean(0)
            local[name] = (counts[rank], mean, ((x - mean) ** 2).sum(0))
    merged = all_reduce_population_stats(local, {"a": 3, "b": 3})
    # end to end: recalibrate(distributed=True) with each rank on its own shard
    torch.manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).double()
    shards = torch.randn(3, 2, 6, 2, generator=torch.Generator().manual_seed(5)).double()
    batchnorm.recalibrate(net, list(shards[rank]), distributed=True)
    # a rank whose data yields no batch of 2 takes part with count 0
    torch.manual_seed(11)
    sparse = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).double()
    mine = list(shards[rank]) if rank != 1 else [shards[1, 0, :1]]
    used = batchnorm.recalibrate(sparse, mine, distributed=True, process_group=None, timeout=5.0)
    empty = _catch(lambda: batchnorm.recalibrate(sparse, [], distributed=True, timeout=5.0))
    return {
        "merged": merged,
        "running": (net[1].running_mean, net[1].running_var),
        "sparse": (used, sparse[1].running_mean, sparse[1].running_var),
        "empty": empty,
    }


def _check_population(results: list[dict]) -> None:
    for name in POP_COUNTS:
        x = _pop_data(name)
        for res in results:
            count, mean, m2 = res["merged"][name]
            assert count == x.shape[0]
            assert torch.allclose(mean, x.mean(0), rtol=0, atol=TOL)
            assert torch.allclose(m2 / (count - 1), x.var(0), rtol=0, atol=TOL)
    torch.manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).double()
    shards = torch.randn(3, 2, 6, 2, generator=torch.Generator().manual_seed(5)).double()
    with torch.no_grad():
        z = net[0](shards.reshape(-1, 2))  # every sample of every shard
    for res in results:
        assert torch.allclose(res["running"][0], z.mean(0), rtol=0, atol=TOL)
        assert torch.allclose(res["running"][1], z.var(0), rtol=0, atol=TOL)
    with torch.no_grad():
        z = net[0](torch.cat([shards[0], shards[2]]).reshape(-1, 2))  # rank 1 had no batch
    for r, res in enumerate(results):
        used, mean, var = res["sparse"]
        assert used == (0 if r == 1 else 12), (r, used)
        assert torch.allclose(mean, z.mean(0), rtol=0, atol=TOL)
        assert torch.allclose(var, z.var(0), rtol=0, atol=TOL)
        assert res["empty"].startswith("ValueError") and "no rank's data" in res["empty"], r


SUB = [0, 2]  # the subgroup of the 3-rank test


def _subgroup_part(rank: int, world: int) -> dict:
    groups = [dist.new_group(SUB), dist.new_group([1])]  # every rank creates every group
    group = groups[0] if rank in SUB else groups[1]
    d = _case_data("subgroup", (3, 4), 1, 9, 0)
    bn = SyncBatchNorm(3, process_group=group, dtype=torch.float64)
    idx = SUB.index(rank) if rank in SUB else None
    x = d["x"][:4] if idx == 0 else d["x"][4:] if idx == 1 else d["x"][:2]
    x = x.clone().requires_grad_(True)
    y = bn(x)
    y.backward(torch.ones_like(y) + x.detach())
    # torch's SyncBatchNorm keeps its group through the conversion (no group given)
    tsb = torch.nn.SyncBatchNorm(3, process_group=group, dtype=torch.float64)
    tsb = convert_sync_batchnorm(torch.nn.Sequential(tsb))[0]
    tsb(x.detach())
    return {
        "y": y.detach(),
        "dx": x.grad,
        "running": bn.running_var.clone(),
        "torch_kept": tsb.process_group is group,
        "torch_running": tsb.running_var.clone(),
    }


def _check_subgroup(results: list[dict]) -> None:
    d = _case_data("subgroup", (3, 4), 1, 9, 0)
    for rows, members in ((d["x"], [0, 2]), (d["x"][:2], [1])):
        x = rows.clone().requires_grad_(True)
        rv = torch.ones(3, dtype=torch.float64)
        y = TF.batch_norm(x, torch.zeros(3, dtype=torch.float64), rv, training=True)
        y.backward(torch.ones_like(y) + x.detach())
        got_y = torch.cat([results[r]["y"] for r in members])
        got_dx = torch.cat([results[r]["dx"] for r in members])
        assert torch.allclose(got_y, y, rtol=0, atol=TOL), members
        assert torch.allclose(got_dx, x.grad, rtol=0, atol=TOL), members
        for r in members:
            assert torch.allclose(results[r]["running"], rv, rtol=0, atol=TOL)
            assert results[r]["torch_kept"], r
            assert torch.allclose(results[r]["torch_running"], rv, rtol=0, atol=TOL), r


# --------------------------------------------------------------------------------------------
# failure modes (2 ranks): every participating rank raises, naming the layer


def _catch(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as err:  # the test inspects type and message
        return f"{type(err).__name__}: {err}"
    return ""


def _robust_part(rank: int, world: int) -> dict:
    out: dict[str, Any] = {}
    x = torch.randn(4, 3, dtype=torch.float64)
    # non-finite statistics on one rank: every rank follows the layer's policy
    if rank == 1:
        x[0, 1] = float("nan")
    bn = SyncBatchNorm(3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(x)
    out["warned"] = any(issubclass(w.category, NonFiniteStatisticsWarning) for w in caught)
    out["untouched"] = bool((bn.running_var == 1).all() and int(bn.num_batches_tracked) == 0)
    strict = SyncBatchNorm(3, dtype=torch.float64, nonfinite="raise")
    out["raised"] = _catch(lambda: strict(x))
    # a channel count that differs across ranks (same model width: the headers tell)
    widths = [4, 8] if rank == 0 else [6, 8]
    model = convert_sync_batchnorm(torch.nn.Sequential(*(torch.nn.BatchNorm1d(c) for c in widths)))
    out["channels"] = _catch(lambda: model[0](torch.randn(5, widths[0])))
    # standalone layers of different widths (messages of different lengths): still an error
    solo = SyncBatchNorm(3 if rank == 0 else 5, name="solo")
    out["solo"] = _catch(lambda: solo(torch.randn(4, solo.num_features)))
    # a rank that skips a layer: rank 0 is in 'a' while rank 1 is already in 'b'
    pair = convert_sync_batchnorm(
        torch.nn.ModuleDict({"a": torch.nn.BatchNorm1d(4), "b": torch.nn.BatchNorm1d(4)})
    )
    z = torch.randn(5, 4)
    out["skipped"] = _catch(lambda: pair["b"](pair["a"](z)) if rank == 0 else pair["b"](z))
    # a layer wider than the first collective holds (the rest goes in a second one)
    full = torch.randn(5, 2100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wide = SyncBatchNorm(2100, dtype=torch.float64)
    mine = (full[:3] if rank == 0 else full[3:]).clone().requires_grad_(True)
    wide(mine).pow(2).sum().backward()
    ref = full.clone().requires_grad_(True)
    y_ref = TF.batch_norm(ref, None, None, training=True)
    y_ref.pow(2).sum().backward()
    assert ref.grad is not None and mine.grad is not None
    out["wide"] = float((mine.grad - (ref.grad[:3] if rank == 0 else ref.grad[3:])).abs().max())
    # standalone layers of different widths, one skipped by rank 1 after the first call
    a, b = SyncBatchNorm(4, name="sa", timeout=5.0), SyncBatchNorm(6, name="sb", timeout=5.0)
    a(torch.randn(5, 4))
    b(torch.randn(5, 6))
    out["skipped_later"] = _catch(lambda: a(z) if rank == 0 else b(torch.randn(5, 6)))
    # recalibration with synchronized layers and a different number of batches per rank
    recal = convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)), timeout=5.0
    )
    batches = [torch.randn(4, 3)] * (2 if rank == 0 else 1)
    out["uneven"] = _catch(lambda: batchnorm.recalibrate(recal, batches, distributed=True))
    # a weight swapped for a shorter one: refused by name before the exchange
    swapped = SyncBatchNorm(4, name="swapped")
    swapped.weight = torch.nn.Parameter(torch.ones(3))
    out["swapped"] = _catch(lambda: swapped(torch.randn(5, 4)))
    # second derivatives: refused by name on every rank (before the backward's exchange), not
    # a detached gradient that allow_unused=True turns into None
    twice = SyncBatchNorm(3, dtype=torch.float64, name="twice")
    xt = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out["second"] = _catch(
        lambda: torch.autograd.grad(twice(xt).pow(3).sum(), xt, create_graph=True)
    )
    # a rank whose input is refused and which goes on to its next batch: its next call is
    # reported on every rank, not merged with the other ranks' earlier call
    skip = SyncBatchNorm(3, name="skip", timeout=5.0)
    if rank == 1:
        out["refused"] = _catch(lambda: skip(torch.randn(4, 5)))
    out["after_refusal"] = _catch(lambda: skip(torch.randn(4, 3)))
    # torch.jit.trace in training mode: refused by name on every rank, before any exchange
    out["traced"] = _catch(lambda: torch.jit.trace(SyncBatchNorm(3), torch.randn(4, 3)))
    # non-reentrant activation checkpointing with the layer ending the segment: the running
    # statistics as torch.nn's layer gives them on the global batch (updated in the recompute)
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    seg = torch.nn.Sequential(torch.nn.Linear(3, 3, dtype=torch.float64), SyncBatchNorm(3))
    oracle = torch.nn.Sequential(copy.deepcopy(seg[0]), torch.nn.BatchNorm1d(3))
    seg[1].double(), oracle.double()
    full = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    checkpoint(seg, full[:3] if rank == 0 else full[3:], use_reentrant=False).sum().backward()
    checkpoint(oracle, full, use_reentrant=False).sum().backward()
    out["checkpoint"] = (
        int(seg[1].num_batches_tracked),
        int(oracle[1].num_batches_tracked),
        float((seg[1].running_mean - oracle[1].running_mean).abs().max()),
        float((seg[1].running_var - oracle[1].running_var).abs().max()),
    )
    # an empty rank's channels_last output is laid out as torch.nn lays out an empty batch's
    xe = torch.randn(4 if rank == 0 else 0, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    out["empty_strides"] = (SyncBatchNorm(4)(xe).stride(), torch.nn.BatchNorm2d(4)(xe).stride())
    # a rank that never arrives: the process group's timeout, then the layer's own timeout;
    # after either, the group's collectives are out of step on that rank: refused there
    sub = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=1.0))
    late = SyncBatchNorm(4, process_group=sub, name="late")
    own = SyncBatchNorm(4, timeout=0.5, name="own")
    if rank == 0:
        t0 = time.monotonic()
        out["pg_timeout"] = _catch(lambda: late(z))
        out["own_timeout"] = _catch(lambda: own(z))
        out["waited"] = time.monotonic() - t0
        t0 = time.monotonic()
        out["out_of_step"] = _catch(lambda: SyncBatchNorm(4, name="next")(z))
        out["refused_at_once"] = time.monotonic() - t0
    else:
        time.sleep(2.0)  # absent from both exchanges
    return out


def _check_robust(results: list[dict]) -> None:
    for r, res in enumerate(results):
        assert res["warned"] and res["untouched"], r
        assert res["raised"].startswith("NonFiniteStatisticsError"), res["raised"]
        msg = res["channels"]
        assert msg.startswith("SyncBatchNormError") and "channel counts differ" in msg, msg
        assert "rank 0: 4, rank 1: 6" in msg and "'0'" in msg, msg
        msg = res["solo"]
        assert msg.startswith("SyncBatchNormError") and "channel counts differ" in msg, msg
        assert "rank 0: 3, rank 1: 5" in msg and "'solo'" in msg, msg
        msg = res["skipped"]
        assert msg.startswith("SyncBatchNormError"), msg
        assert "not at the same synchronized layer" in msg and "'a'" in msg and "'b'" in msg, msg
        assert res["wide"] < TOL, res["wide"]
        msg = res["skipped_later"]
        assert msg.startswith("SyncBatchNormError"), msg
        assert "not at the same synchronized layer" in msg and "'sa' (call 1" in msg, msg
        assert "'sb' (call 1" in msg and "same control flow" in msg, msg
        msg = res["swapped"]
        assert msg.startswith(
            "BatchNormInputError: SyncBatchNorm(4) 'swapped': weight has shape (3,)"
        ), msg
        msg = res["second"]
        assert msg.startswith(
            "BatchNormInputError: SyncBatchNorm(3) 'twice': no second derivative"
        ), msg
        msg = res["uneven"]
        assert msg.startswith("SyncBatchNormError"), msg
        assert "'1' (call 1" in msg and "same number of batches" in msg, msg
    first = results[0]
    for key, layer in (("pg_timeout", "'late'"), ("own_timeout", "'own'")):
        msg = first[key]
        assert msg.startswith("SyncBatchNormError") and layer in msg, msg
        assert "did not reach this layer" in msg, msg
    assert "0.5 s (the layer's timeout)" in first["own_timeout"]
    assert first["waited"] < PG_TIMEOUT  # bounded by the short timeouts, not the default
    msg = first["out_of_step"]
    assert msg.startswith("SyncBatchNormError") and "'next' on rank 0" in msg, msg
    assert "gave up an earlier exchange" in msg and "re-create it" in msg, msg
    assert first["refused_at_once"] < 0.5
    assert results[1]["refused"].startswith("BatchNormInputError"), results[1]["refused"]
    for r, res in enumerate(results):
        msg = res["after_refusal"]
        assert msg.startswith("SyncBatchNormError"), (r, msg)
        assert "'skip' (call 0" in msg and "'skip' (call 1" in msg, (r, msg)
        msg = res["traced"]
        assert msg.startswith("SyncBatchNormError") and "torch.jit.trace cannot record" in msg
        ours, theirs, d_mean, d_var = res["checkpoint"]
        assert ours == theirs == 2 and d_mean < TOL and d_var < TOL, res["checkpoint"]
        assert res["empty_strides"][0] == res["empty_strides"][1], res["empty_strides"]


# --------------------------------------------------------------------------------------------
# the launches


def _two_ranks(rank: int, world: int, out: Path) -> None:
    _exact_worker(rank, world, out)
    # for the exit check below: the default group is out of step on rank 0 after the timeouts
    spare = dist.new_group([0, 1])
    _save(
        out / f"more{rank}.pt", {"ddp": _ddp_part(rank, world), "robust": _robust_part(rank, world)}
    )
    # a rank whose process exits: the other is told so, not that it timed out
    ready = out / "ready"
    if rank == 1:
        end = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < end:  # rank 0 is done with rank 1
            time.sleep(0.05)
        os._exit(0)
    ready.touch()
    gone = SyncBatchNorm(3, timeout=8.0, name="gone", process_group=spare)
    t0 = time.monotonic()
    msg = _catch(lambda: gone(torch.randn(4, 3)))
    (out / "peer_exit.txt").write_text(f"{time.monotonic() - t0}\n{msg}")


def _three_ranks(rank: int, world: int, out: Path) -> None:
    _exact_worker(rank, world, out)
    more = {"sub": _subgroup_part(rank, world), "pop": _population_part(rank, world)}
    _save(out / f"more{rank}.pt", more)


@pytest.mark.timeout(120)
def test_two_ranks_exact_ddp_and_failure_modes(tmp_path: Path) -> None:
    launch(_two_ranks, 2, tmp_path)
    _check_exact(2, tmp_path)
    more = [torch.load(tmp_path / f"more{r}.pt", weights_only=False) for r in range(2)]
    _check_ddp([m["ddp"] for m in more], 2)
    _check_robust([m["robust"] for m in more])
    waited, msg = (tmp_path / "peer_exit.txt").read_text().split("\n", 1)
    assert msg.startswith("SyncBatchNormError") and "'gone'" in msg, msg
    assert "another rank closed its connection" in msg and "did not complete" not in msg, msg
    assert float(waited) < 8.0


@pytest.mark.timeout(120)
def test_three_ranks_exact_subgroup_and_recalibration(tmp_path: Path) -> None:
    launch(_three_ranks, 3, tmp_path)
    _check_exact(3, tmp_path)
    more = [torch.load(tmp_path / f"more{r}.pt", weights_only=False) for r in range(3)]
    _check_subgroup([m["sub"] for m in more])
    _check_population([m["pop"] for m in more])


# --------------------------------------------------------------------------------------------
# the example a user runs with torchrun


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_sync_bn.py"


def _example_entry(rank: int, world: int, port: int, out: Path) -> None:
    import contextlib
    import importlib.util
    import io

    # what torchrun sets for each process
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["BATCHNORM_BACKEND"] = "torch"
    spec = importlib.util.spec_from_file_location("ddp_sync_bn", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = example.main(["--steps", "30", "--data", "synthetic", "--per-rank-batch", "4"])
    (out / f"example{rank}.txt").write_text(f"{code}\n{buf.getvalue()}")


@pytest.mark.timeout(120)
def test_example_trains_with_ddp_and_reports_identical_running_stats(tmp_path: Path) -> None:
    _start(_example_entry, 2, (2, _free_port(), tmp_path), deadline=150)
    code, text = (tmp_path / "example0.txt").read_text().split("\n", 1)
    assert code == "0" and (tmp_path / "example1.txt").read_text().startswith("0")
    assert "running statistics identical on all ranks: True" in text
    acc = float(text.split("held-out accuracy: ")[1].split()[0])
    assert acc > 0.2  # 10 classes: better than chance after 30 steps


# --------------------------------------------------------------------------------------------
# one process: the math and the conversion


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda c: sum(c) >= 1),
    seed=st.integers(0, 2**16),
)
def test_merge_stats_equals_statistics_of_the_union(counts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    parts = [rng.normal(rng.uniform(-1e3, 1e3), rng.uniform(0.1, 10), (n, 2)) for n in counts]
    means = np.stack([p.mean(0) if len(p) else np.full(2, np.nan) for p in parts])
    m2s = np.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else np.full(2, np.nan) for p in parts])
    total, mean, m2 = merge_stats(torch.tensor(counts), torch.tensor(means), torch.tensor(m2s))
    union = np.concatenate(parts)
    assert int(total) == len(union)
    np.testing.assert_allclose(mean.numpy(), union.mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(m2.numpy(), ((union - union.mean(0)) ** 2).sum(0), rtol=1e-9)


def test_without_process_group_it_is_plain_bn() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    ours = SyncBatchNorm(4, dtype=torch.float64, momentum=None, backend="torch")
    ref = torch.nn.BatchNorm2d(4, dtype=torch.float64, momentum=None)
    for m in (ours, ref):
        x.grad = None
        m(x).backward(dy)
        m.grad_x = x.grad.clone()  # type: ignore[assignment]
    assert torch.allclose(ours.grad_x, ref.grad_x, atol=TOL)
    assert torch.allclose(ours.running_var, ref.running_var, atol=TOL)
    assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=TOL)


def test_convert_keeps_state_options_and_leaves_variants_alone() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8, momentum=0.3),
        batchnorm.BatchNorm(5, axis=-1, unbiased_running_var=False, center=False),
        batchnorm.GhostBatchNorm(4, virtual_batch_size=2),
        torch.nn.Sequential(torch.nn.BatchNorm1d(16, affine=False)),
    ).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_()
        net[1].weight.uniform_()
        net[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = convert_sync_batchnorm(net, timeout=3.0)
    assert out is net
    assert [type(m).__name__ for m in (net[1], net[2], net[3], net[4][0])] == [
        "SyncBatchNorm",
        "SyncBatchNorm",
        "GhostBatchNorm",
        "SyncBatchNorm",
    ]
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not net[1].training and net[1].momentum == 0.3 and net[1].timeout == 3.0
    assert net[2].axis == -1 and not net[2].unbiased_running_var and net[2].bias is None
    assert net[4][0].weight is None and net[4][0].layer_name() == "SyncBatchNorm(16) '4.0'"
    assert {net[1].sync_width, net[2].sync_width, net[4][0].sync_width} == {16}
    bare = convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
    assert isinstance(bare, SyncBatchNorm)
    bn = torch.nn.BatchNorm1d(3)  # listed twice in one container: one layer, synced at both
    twice = convert_sync_batchnorm(torch.nn.Sequential(bn, torch.nn.ReLU(), bn))
    assert isinstance(twice[0], SyncBatchNorm) and twice[0] is twice[2]
    # eval mode needs no process group and matches torch.nn
    x = torch.randn(2, 8, 4, 4)
    ref = torch.nn.BatchNorm2d(8, momentum=0.3).eval()
    ref.load_state_dict({k[2:]: v for k, v in before.items() if k.startswith("1.")})
    assert torch.allclose(net[1](x), ref(x), atol=1e-6)


class _PlainSubclass(torch.nn.BatchNorm2d):
    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.register_buffer("seen", torch.tensor(3))
        self.tag = "mine"


class _ForwardSubclass(torch.nn.BatchNorm1d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 2


class _OurSubclass(batchnorm.BatchNorm2d):
    pass


class _GhostSubclass(batchnorm.GhostBatchNorm):
    pass


def test_convert_takes_subclasses_like_torch_and_skips_nothing_silently() -> None:
    net = torch.nn.Sequential(
        _PlainSubclass(4),
        _ForwardSubclass(3),
        _OurSubclass(2),
        _GhostSubclass(2, virtual_batch_size=2),
    )
    with torch.no_grad():
        net[0].running_mean.fill_(0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_sync_batchnorm(net)
    texts = [str(w.message) for w in caught]
    assert [type(m).__name__ for m in net] == [
        "SyncBatchNorm",
        "SyncBatchNorm",
        "SyncBatchNorm",
        "_GhostSubclass",
    ]
    # the subclass's own state is kept, and its state_dict still loads
    assert int(net[0].seen) == 3 and net[0].tag == "mine"
    assert torch.equal(net[0].running_mean, torch.full((4,), 0.5))
    net[0].load_state_dict(_PlainSubclass(4).state_dict())
    assert len(texts) == 2, texts
    assert any("'1'" in t and "forward" in t and "not kept" in t for t in texts), texts
    assert any("'3'" in t and "_GhostSubclass" in t and "left unchanged" in t for t in texts)
    # lazy layers: materialized ones are converted, uninitialized ones are a clear error
    lazy = torch.nn.LazyBatchNorm1d()
    lazy.initialize_parameters(torch.randn(2, 5))  # initialized, still of the lazy class
    assert isinstance(convert_sync_batchnorm(torch.nn.Sequential(lazy))[0], SyncBatchNorm)
    ran = torch.nn.Sequential(torch.nn.LazyBatchNorm1d())
    ran(torch.randn(4, 3))  # a forward turns it into BatchNorm1d
    assert convert_sync_batchnorm(ran)[0].num_features == 3
    with pytest.raises(ValueError, match="'1' \\(LazyBatchNorm2d\\) is not initialized"):
        convert_sync_batchnorm(
            torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.LazyBatchNorm2d())
        )


def test_bad_arguments_and_mask_are_clear_errors() -> None:
    # every exchange would fail (inf overflows the wait's timedelta) or time out at once
    for bad in (0, -5, math.inf, math.nan, 1e20, True, "30"):
        with pytest.raises(ValueError, match=r"^SyncBatchNorm\(3\): timeout must be a number"):
            SyncBatchNorm(3, timeout=bad)  # type: ignore[arg-type]
        model = torch.nn.Sequential(SyncBatchNorm(3, timeout=5.0))
        with pytest.raises(ValueError, match=r"^convert_sync_batchnorm: timeout must be"):
            convert_sync_batchnorm(model, timeout=bad)  # type: ignore[arg-type]
        assert model[0].timeout == 5.0
        with pytest.raises(ValueError, match=r"^recalibrate\(distributed=True\): timeout must"):
            batchnorm.recalibrate(model, [torch.randn(4, 3)], distributed=True, timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"^all_reduce_population_stats: timeout must"):
            all_reduce_population_stats({}, {}, timeout=bad)  # type: ignore[arg-type]
    assert SyncBatchNorm(3, timeout=np.float32(2.5)).timeout == 2.5
    with pytest.raises(ValueError, match="sync_width must be >= num_features"):
        SyncBatchNorm(3, sync_width=2)
    with pytest.raises(batchnorm.BatchNormInputError, match="does not support a mask"):
        SyncBatchNorm(3)(torch.randn(4, 3, 5), mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(batchnorm.BatchNormInputError, match=r"expected 3 channels"):
        SyncBatchNorm(3)(torch.randn(4, 5))


def test_empty_batch_without_a_process_group_is_plain_bn() -> None:
    """Alone, SyncBatchNorm is plain BN: an empty batch gives an empty output, as BatchNorm
    does (with a process group an empty rank joins the exchange instead: see the uneven-batch
    tests)."""
    bn = batchnorm.SyncBatchNorm(4)
    y = bn(torch.randn(0, 4))
    assert y.shape == (0, 4) and int(bn.num_batches_tracked) == 0


def test_torch_converter_takes_our_fixed_rank_layers_and_ours_takes_both() -> None:
    """As the README says: torch's converter finds our BatchNorm1d/2d/3d by class and makes
    torch.nn.SyncBatchNorm of them (state copied), the any-axis BatchNorm it leaves
    per-replica; ours converts every kind to batchnorm.SyncBatchNorm and leaves the variants
    (also those built on BatchNorm2d) as they are."""
    net = torch.nn.Sequential(
        batchnorm.BatchNorm2d(4), torch.nn.BatchNorm2d(4), batchnorm.BatchNorm(4, axis=1)
    )
    with torch.no_grad():
        net[0].running_mean.fill_(0.25)
        net[0].weight.fill_(2.0)
    by_torch = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert [type(m) for m in by_torch] == [
        torch.nn.SyncBatchNorm,
        torch.nn.SyncBatchNorm,
        batchnorm.BatchNorm,
    ]
    assert torch.equal(by_torch[0].running_mean, torch.full((4,), 0.25))
    assert torch.equal(by_torch[0].weight, torch.full((4,), 2.0))
    by_us = batchnorm.convert_sync_batchnorm(net)
    assert all(type(m) is batchnorm.SyncBatchNorm for m in by_us)
    variants = torch.nn.Sequential(
        batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2), batchnorm.BatchRenorm3d(4)
    )
    kept = batchnorm.convert_sync_batchnorm(variants)
    assert [type(m) for m in kept] == [batchnorm.GhostBatchNorm2d, batchnorm.BatchRenorm3d]


def test_convert_model_takes_synchronized_layers_both_ways() -> None:
    """convert_model swaps torch.nn.SyncBatchNorm and ours like the other classes: state,
    mode, process group and options kept (torch's layer was left in place, ours refused)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.BatchNorm2d(4)
    )
    for _ in range(2):
        net(torch.randn(4, 3, 6, 6))
    group = object()  # what the layers hold as their group (nothing communicates here)
    theirs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net), group)
    theirs[3].eval()
    states = {i: copy.deepcopy(theirs[i].state_dict()) for i in (1, 3)}
    ours = batchnorm.convert_model(theirs)  # in place: the group object is kept, not copied
    for i in (1, 3):
        layer = ours[i]
        assert type(layer) is batchnorm.SyncBatchNorm and layer.process_group is group
        assert layer.name == str(i) and layer.sync_width == 4
        assert layer.training == (i == 1)
        for key, value in states[i].items():
            assert torch.equal(layer.state_dict()[key], value), key
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():  # eval mode, no process group needed: one function
        torch.testing.assert_close(ours.eval()(x), net.eval()(x))
    ours[1].train()
    back = batchnorm.convert_model(ours, to="torch")
    for i in (1, 3):
        assert type(back[i]) is torch.nn.SyncBatchNorm and back[i].process_group is group
        assert back[i].training == (i == 1)
        for key, value in states[i].items():
            assert torch.equal(back[i].state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), net(x))
    # a per-layer timeout has no place in torch's layer: dropped with a warning saying so
    timed = batchnorm.convert_sync_batchnorm(copy.deepcopy(net), timeout=30.0)
    with pytest.warns(UserWarning, match="no per-layer timeout, so timeout=30.0 is dropped"):
        batchnorm.convert_model(timed, to="torch")
    # what torch.nn.SyncBatchNorm cannot express is still refused by name
    odd = torch.nn.Sequential(batchnorm.SyncBatchNorm(4, axis=-1))
    with pytest.raises(ValueError, match=r"layer '0' .*axis=-1"):
        batchnorm.convert_model(odd, to="torch")


def _doctor_on_rank_zero(rank: int, world: int, out: Path) -> None:
    torch.manual_seed(0)
    body = torch.nn.Sequential(
        torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4), torch.nn.ReLU()
    )
    ours = batchnorm.convert_sync_batchnorm(copy.deepcopy(body), timeout=5.0)
    theirs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(body))
    if rank == 0:
        x = torch.randn(128, 3)
        found = []
        for model in (ours.eval(), theirs.eval()):
            start = time.monotonic()
            report = batchnorm.doctor(model, x, num_batches=4, batch_size=32)
            found.append(
                ([(f.check, f.severity) for f in report.findings], time.monotonic() - start)
            )
        _save(out / "doctor.pt", found)
    else:  # the other rank takes part in nothing: it waits for rank 0's report
        end = time.monotonic() + 60
        while not (out / "doctor.pt").exists() and time.monotonic() < end:
            time.sleep(0.1)


@pytest.mark.timeout(120)
def test_doctor_on_one_rank_of_a_synchronized_model_does_not_wait_for_the_others(
    tmp_path: Path,
) -> None:
    # diagnostics usually run on rank 0 alone: the doctor's probes normalize with the local
    # batch instead of waiting at every synchronized layer for ranks that never come
    launch(_doctor_on_rank_zero, 2, tmp_path)
    found = torch.load(tmp_path / "doctor.pt", weights_only=False)
    for checks, seconds in found:
        assert ("forward-failed", "error") not in checks, checks
        assert ("initial-running-stats", "error") in checks, checks
        assert seconds < 4.0
