"""``sync-bn`` — per-replica BN vs synchronized BN when each replica sees a small batch.

Data-parallel training splits every global batch over R replicas. With plain BN each replica
normalizes with the statistics of its own slice, so at a per-replica batch of 2–8 the statistics
are noisy and the replicas' running statistics drift apart; synchronized BN
(:class:`batchnorm.SyncBatchNorm`) normalizes with the statistics of the whole global batch at
the cost of one collective per BN layer in the forward and one in the backward.

Each arm trains the same network — a small CNN (``model=cnn``: BN2d, whose statistics cover
b·H·W values per channel) or an MLP (``model=mlp``: BN1d, b values per channel per replica) —
with ``DistributedDataParallel`` on ``world`` processes
(gloo on 127.0.0.1, one thread each), every replica taking its slice of the same global batches,
at several per-replica batch sizes and seeds. Both arms run the plain-torch backend, so the
throughput difference is the synchronization. The synchronized arm trains exactly as one process
on the concatenated global batch would (checked in the tests, to float32 rounding). Measured per
run: held-out accuracy (rank 0's model in eval mode; with per-replica BN that means rank 0's
running statistics, taken from rank 0's slices only, the ones DDP's default buffer broadcast
would give every rank; the mean over all ranks' models is reported alongside), training
throughput (global samples per second after a warm-up), the collectives per step (BN exchanges
counted at ``torch.distributed.all_gather``, DDP gradient all-reduces counted by a communication
hook; DDP's buffer broadcast is off in both arms) and the largest difference between the ranks'
running statistics. The global batches are drawn with replacement (``torch.randint``), the
same in both arms.

Claims (verdicts computed from the per-seed numbers):

* at the smallest per-replica batch, synchronized BN reaches a higher held-out accuracy than
  per-replica BN by more than the seed-to-seed spread;
* the accuracy advantage of synchronized BN shrinks as the per-replica batch grows: the
  advantage at the smallest batch is positive and exceeds the one at the largest by more than
  the four arms' stds summed;
* synchronized BN lowers training throughput at every per-replica batch measured, by more than
  the seed-to-seed spread of the samples/s;
* synchronized BN adds exactly 2 collectives per BN layer per step, per-replica BN none;
* synchronized BN keeps the running statistics identical on every rank; per-replica BN does not.

As in paper-mnist, a diverged run ranks lowest: an arm with a diverged seed has accuracy −∞ in
the accuracy claims, and a comparison whose two arms both diverged supports nothing. Spread =
std + std over seeds, unknown with one seed (the ``--quick`` size): then any difference passes.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from batchnorm.lab import train
from batchnorm.lab.config import (
    BaseConfig,
    ConfigError,
    check_distinct,
    check_non_negative,
    check_widths,
)
from batchnorm.lab.data import Dataset
from batchnorm.lab.experiments._nets import (
    RANK_RULE,
    exceeds_spread,
    finite,
    mean_of,
    spread_rule,
)
from batchnorm.lab.registry import register
from batchnorm.lab.results import Claim, Results, RunContext, RunData, atomic_write_json, mean_std

NAME = "sync-bn"
SOURCE = "Ioffe & Szegedy 2015, Sec. 3 (the mini-batch); synchronized BN across replicas"
ARMS = ("local", "sync")
# what the fork server imports once for all replicas (DistributedDataParallel imports dynamo,
# which takes seconds)
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "batchnorm.sync"]
LABELS = {"local": "per-replica BN", "sync": "synchronized BN"}


@dataclass
class SyncBNConfig(BaseConfig):
    """Settings of the sync-bn experiment (see the module docstring)."""

    seeds: int = 3
    world: int = 2
    per_replica_batches: tuple[int, ...] = (2, 4, 8, 16)
    steps: int = 400
    warmup: int = 10
    lr: float = 0.05  # at a global batch of 32; scaled linearly with the global batch
    momentum: float = 0.9
    model: str = "cnn"
    channels: tuple[int, ...] = (16, 32)
    hidden: tuple[int, ...] = (100, 100)
    n_train: int = 10000
    n_eval: int = 2000
    group_timeout: float = 900.0

    QUICK = {
        "seeds": 1,
        "per_replica_batches": (2,),
        "steps": 25,
        "warmup": 5,
        "channels": (8, 16),
        "n_train": 500,
        "n_eval": 300,
        "group_timeout": 120.0,
    }

    def validate(self) -> None:
        super().validate()
        check_distinct(per_replica_batches=self.per_replica_batches)
        check_widths(channels=self.channels, hidden=self.hidden)
        check_non_negative(momentum=self.momentum)
        if self.n_train < 0 or self.n_eval < 0:
            raise ConfigError(
                f"n_train and n_eval must be >= 0 (0 = all examples), got {self.n_train}, "
                f"{self.n_eval}"
            )
        if self.world < 2:
            raise ConfigError(f"world must be >= 2 replicas, got {self.world}")
        if not self.per_replica_batches or min(self.per_replica_batches) < 1:
            raise ConfigError("per_replica_batches must be non-empty and >= 1")
        if self.steps <= self.warmup or self.warmup < 1:
            raise ConfigError(f"need 1 <= warmup < steps, got {self.warmup} and {self.steps}")
        if self.model not in ("cnn", "mlp"):
            raise ConfigError(f"model must be 'cnn' or 'mlp', got {self.model!r}")
        if self.model == "mlp" and min(self.per_replica_batches) < 2:
            # per-replica BN1d normalizes each feature over the replica's slice alone
            raise ConfigError(
                "per_replica_batches must be >= 2 with model=mlp, got "
                f"{self.per_replica_batches}: per-replica BN after a fully connected layer "
                "normalizes each feature over the replica's own samples, which needs at least 2"
            )
        if self.lr <= 0 or self.group_timeout <= 0:
            raise ConfigError("lr and group_timeout must be positive")


# --------------------------------------------------------------------------------------------
# one replica (runs in its own process)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs: not gone and not a zombie (an exited process whose own
    parent has not collected it yet still answers ``os.kill(pid, 0)``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a process of another user took the number
            return False
        return True


def _exit_with(parent: int, every: float = 0.5) -> None:
    """End this replica when the process that runs the experiment is gone: a replica still
    being started when the run was interrupted (or one whose parent was killed) is not among
    those the parent kills, and would wait at a collective for the group's timeout, holding
    the parent's output pipes open."""

    def watch() -> None:
        while _alive(parent):
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="sync-bn-parent-watch", daemon=True).start()


def _replica(rank: int, world: int, port: int, job: dict[str, Any], out_dir: str) -> None:
    """Train one replica of one arm; rank 0 also evaluates. Reads ``data.pt`` and writes
    ``<rank>.json`` in ``out_dir``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills replicas
    if job.get("parent") is not None:  # the runner's pid (_run_group); a direct caller may omit it
        _exit_with(job["parent"])
    os.environ["BATCHNORM_BACKEND"] = "torch"  # the same compute backend in both arms
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from batchnorm.lab import models
    from batchnorm.nn.batchnorm import SmallBatchWarning, _BatchNormBase
    from batchnorm.sync import convert_sync_batchnorm

    warnings.simplefilter("ignore", SmallBatchWarning)  # small per-replica batches are the point
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=job["timeout"]),
    )
    try:
        x_train, y_train, x_test, y_test = torch.load(Path(out_dir) / "data.pt")
        torch.manual_seed(job["seed"])
        # cnn: BN2d, statistics over b·H·W values per channel; mlp: BN1d, over b values
        net: torch.nn.Module = (
            models.SmallCNN(tuple(x_train.shape[1:]), job["classes"], job["channels"], bn="before")
            if job["model"] == "cnn"
            else models.MLP(
                x_train[0].numel(), job["hidden"], job["classes"], activation="relu", bn="before"
            )
        )
        if job["arm"] == "sync":
            net = convert_sync_batchnorm(net)
        bns = [m for m in net.modules() if isinstance(m, _BatchNormBase)]
        model = DDP(net, forward_sync_buffers=False)
        counts = {"bn": 0, "ddp": 0}

        def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations by identity
            state["ddp"] += 1
            return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

        model.register_comm_hook(counts, hook)
        all_gather = dist.all_gather

        def counting_all_gather(*args: Any, **kwargs: Any) -> Any:
            counts["bn"] += 1
            return all_gather(*args, **kwargs)

        dist.all_gather = counting_all_gather  # this process only: counts the BN exchanges
        lr = job["lr"] * world * job["batch"] / 32  # the linear scaling rule (Goyal et al. 2017)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=job["momentum"])
        batches = torch.Generator().manual_seed(job["seed"])
        b = job["batch"]
        losses = []
        t0 = time.perf_counter()
        desc = f"{job['arm']} batch {b} seed {job['seed']}"
        show = bool(job.get("progress")) and rank == 0
        with train.progress_bar(job["steps"], desc, show) as advance:
            for step in range(job["steps"]):
                if step == job["warmup"]:  # time and count the steady state only
                    t0 = time.perf_counter()
                    counts.update(bn=0, ddp=0)
                idx = torch.randint(len(x_train), (world * b,), generator=batches)
                mine = idx[rank * b : (rank + 1) * b]  # this replica's slice of the global batch
                loss = F.cross_entropy(model(x_train[mine]), y_train[mine])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if (step + 1) % 100 == 0:
                    advance(100)
        seconds = time.perf_counter() - t0
        timed = job["steps"] - job["warmup"]
        dist.all_gather = all_gather
        net.eval()
        with torch.no_grad():
            acc = float((net(x_test).argmax(1) == y_test).float().mean())
        # a non-finite loss spreads to every rank through the averaged gradients, so the ranks
        # keep stepping together (stopping one early would leave the others waiting)
        diverged = not all(np.isfinite(losses))
        stats = torch.cat(
            [t for m in bns for t in (m.running_mean, m.running_var) if t is not None]
        )
        everyone = [torch.empty_like(stats) for _ in range(world)]
        all_gather(everyone, stats)
        spread = max(float((s - everyone[0]).abs().max()) for s in everyone)
        result = {
            "rank": rank,
            "accuracy": None if diverged else acc,
            "diverged": diverged,
            "loss": None if diverged else float(np.mean(losses[-10:])),
            "samples_per_s": world * b * timed / seconds,
            "bn_collectives_per_step": counts["bn"] / timed,
            "ddp_allreduces_per_step": counts["ddp"] / timed,
            "bn_layers": len(bns),
            "running_stats_max_diff": spread,
        }
        if job.get("save_state"):  # the trained weights and statistics, for checks
            torch.save(net.state_dict(), Path(out_dir) / f"state{rank}.pt")
        atomic_write_json(Path(out_dir) / f"{rank}.json", result)
        # tear DDP down while the group is up on every rank (a reducer destroyed after a peer
        # exited can block this process's exit)
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_group(
    cfg: SyncBNConfig,
    ds: Dataset,
    arm: str,
    batch: int,
    seed: int,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Spawn ``cfg.world`` replicas for one (arm, batch, seed); return rank 0's measurements
    (and the per-rank accuracies)."""
    import torch
    import torch.multiprocessing as mp

    job = {
        "arm": arm,
        "batch": batch,
        "seed": seed,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "model": cfg.model,
        "channels": tuple(cfg.channels),
        "hidden": tuple(cfg.hidden),
        "classes": ds.num_classes,
        "timeout": min(cfg.group_timeout, 300.0),
        "parent": os.getpid(),  # replicas end when this process does (_exit_with)
        "progress": train.progress_enabled(progress),  # rank 0 draws the bar, on this terminal
    }
    # a fork server that imported torch once starts the replicas quickly and cleanly
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory(prefix="sync-bn-") as tmp:
        torch.save((ds.x_train, ds.y_train, ds.x_test, ds.y_test), Path(tmp) / "data.pt")
        if method == "forkserver" and threading.current_thread() is threading.main_thread():
            # Ctrl-C is this process's to handle: a fork server started while SIGINT is ignored
            # keeps ignoring it (no traceback from its import of torch) and so do the replicas
            # it forks (see _replica)
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                from multiprocessing import forkserver

                forkserver.ensure_running()
            finally:
                signal.signal(signal.SIGINT, old)
        ctx = mp.start_processes(
            _replica,
            args=(cfg.world, _free_port(), job, tmp),
            nprocs=cfg.world,
            join=False,
            start_method=method,
        )
        end = time.monotonic() + cfg.group_timeout
        try:
            while not ctx.join(timeout=0.5):  # re-raises a replica's error
                if time.monotonic() > end:
                    raise TimeoutError(
                        f"sync-bn: {arm} b={batch} seed={seed} did not finish within "
                        f"{cfg.group_timeout} s (raise --set group_timeout=...)"
                    )
        except BaseException:
            # interrupted or failed: no replica may outlive the run (the interpreter would wait
            # for it at exit, up to the group's timeout)
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise
        per_rank = [json.loads((Path(tmp) / f"{r}.json").read_text()) for r in range(cfg.world)]
    out = dict(per_rank[0])
    out["rank_accuracies"] = [r["accuracy"] for r in per_rank]
    # every replica's count: the claim is about each of them, not rank 0's alone
    out["rank_bn_collectives_per_step"] = [r["bn_collectives_per_step"] for r in per_rank]
    return out


# --------------------------------------------------------------------------------------------
# figures


def figures(run: RunData, out: Path) -> list[Path]:
    """Held-out accuracy and throughput per per-replica batch, both arms (mean ± std)."""
    from batchnorm.lab import plots

    s = run.series
    cats = [f"b={b}" for b in s["batches"]]
    fig, axes = plots.new_figure(2, size=(4.8, 3.4))
    plots.grouped_points(
        axes[0],
        cats,
        {LABELS[a]: s["accuracy"][a] for a in ARMS},
        ylabel="held-out accuracy, rank 0's model",
        title=f"{s['world']} replicas: accuracy",
    )
    vals = [v for a in ARMS for per in s["accuracy"][a] for v in per if v is not None]
    if vals:
        axes[0].set_ylim(max(0.0, min(vals) - 0.05), min(1.0, max(vals) + 0.03))
    plots.grouped_points(
        axes[1],
        cats,
        {LABELS[a]: s["samples_per_s"][a] for a in ARMS},
        ylabel="global samples / s",
        title="training throughput",
    )
    for ax in axes:
        ax.set_xlabel("per-replica batch")
    return [plots.save_figure(fig, out / "sync_bn.png")]


# --------------------------------------------------------------------------------------------
# the experiment


@register(
    NAME,
    config=SyncBNConfig,
    figures=figures,
    source=SOURCE,
    description="DDP on gloo processes: per-replica BN vs SyncBatchNorm at small per-replica "
    "batches — accuracy, throughput, collectives per step, running-statistics agreement",
)
def run(cfg: SyncBNConfig, ctx: RunContext) -> Results:
    """Train every (arm, per-replica batch, seed) on its own process group; claims from the
    per-seed numbers."""
    full = ctx.load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    ds = full.subset(train=cfg.n_train or None, test=cfg.n_eval or None)
    seeds = cfg.seed_list()
    batches = sorted(cfg.per_replica_batches)  # the claims compare the smallest and the largest
    rows: list[dict[str, Any]] = []
    res: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for b in batches:
        for arm in ARMS:
            res[arm, b] = []
            for seed in seeds:
                ctx.log(f"{arm} b={b} seed={seed}: {cfg.world} replicas")
                r = ctx.cached(
                    f"{arm}-b{b}-seed{seed}",
                    partial(_run_group, cfg, ds, arm, b, seed, ctx.progress),
                )
                res[arm, b].append(r)
                rows.append({"arm": arm, "per_replica_batch": b, "seed": seed, **r})

    def per_seed(arm: str, b: int, key: str) -> list[float | None]:
        return [r[key] for r in res[arm, b]]

    def diverged(arm: str, b: int) -> list[bool]:
        return [bool(r["diverged"]) for r in res[arm, b]]

    def stats_diff(arm: str, b: int) -> float:
        # a non-finite difference (NaN running statistics, stored as null) is no agreement
        vals = per_seed(arm, b, "running_stats_max_diff")
        return max(float("inf") if v is None else float(v) for v in vals)

    def accuracy_cmp(b: int) -> dict[str, Any]:
        return exceeds_spread(
            per_seed("sync", b, "accuracy"),
            per_seed("local", b, "accuracy"),
            diverged("sync", b),
            diverged("local", b),
            names=(f"sync/b={b}", f"local/b={b}"),
        )

    arms: dict[str, Any] = {}
    for arm in ARMS:
        for b in batches:
            arms[f"{arm}/b={b}"] = {
                "final_accuracy": mean_std(per_seed(arm, b, "accuracy")),
                # every rank's model, not only rank 0's (per-replica BN: each rank's own
                # running statistics)
                "accuracy_mean_over_ranks": mean_std(
                    [mean_of(r.get("rank_accuracies", [])) for r in res[arm, b]]
                ),
                "samples_per_s": mean_std(per_seed(arm, b, "samples_per_s")),
                "bn_collectives_per_step": mean_std(per_seed(arm, b, "bn_collectives_per_step")),
                "ddp_allreduces_per_step": mean_std(per_seed(arm, b, "ddp_allreduces_per_step")),
                "diverged": sum(bool(r["diverged"]) for r in res[arm, b]),
                "running_stats_max_diff": stats_diff(arm, b),
            }

    claims: list[Claim] = []
    b0, b1 = batches[0], batches[-1]
    small = accuracy_cmp(b0)
    claims.append(
        Claim(
            id="sync-more-accurate-small-batch",
            statement=f"{cfg.model}: with {cfg.world} replicas of {b0} samples each, "
            "synchronized BN reaches "
            "a higher held-out accuracy than per-replica BN by more than the seed-to-seed spread",
            verdict=small["diff"] is not None and small["exceeds"] and small["diff"] > 0,
            measured={
                "sync": mean_std(per_seed("sync", b0, "accuracy")),
                "local": mean_std(per_seed("local", b0, "accuracy")),
                **small["measured"],
            },
            source=SOURCE,
            seeds=seeds,
            details="accuracy of rank 0's model in eval mode after "
            f"{cfg.steps} steps; {spread_rule(len(seeds), 'std(sync) + std(local)')}; "
            f"supported if sync - local > spread; {RANK_RULE}",
        )
    )
    if len(batches) >= 2:
        large = accuracy_cmp(b1)
        shrink = (
            None
            if small["diff"] is None or large["diff"] is None
            else small["diff"] - large["diff"]
        )
        shrink_spread = small["spread"] + large["spread"]
        claims.append(
            Claim(
                id="sync-advantage-shrinks",
                statement=f"{cfg.model}: the accuracy advantage of synchronized BN over "
                "per-replica BN is "
                f"smaller at a per-replica batch of {b1} than at {b0}",
                verdict=shrink is not None
                and small["diff"] is not None
                and small["diff"] > 0
                and shrink > shrink_spread,
                measured={
                    f"advantage_b{b0}": small["measured"]["difference"],
                    f"advantage_b{b1}": large["measured"]["difference"],
                    "shrink": finite(shrink),
                    "spread": shrink_spread,
                    **({"spread_note": small["measured"]["spread_note"]} if len(seeds) < 2 else {}),
                    f"diverged_b{b0}": small["measured"]["diverged"],
                    f"diverged_b{b1}": large["measured"]["diverged"],
                },
                source=SOURCE,
                seeds=seeds,
                details="advantage = mean accuracy(sync) - mean accuracy(local) over seeds; "
                "shrink = advantage at the smallest batch - advantage at the largest; "
                + spread_rule(
                    len(seeds), "the four arms' stds (sync and local at both batches) summed"
                )
                + "; supported if the advantage at the smallest batch is positive and shrink > "
                f"spread; {RANK_RULE} (a diverged arm makes the advantage +-inf: local "
                "diverging at the smallest batch only is the largest advantage)",
            )
        )
    ratios = {}
    slower: dict[str, bool] = {}
    sps_spread: dict[str, float] = {}
    for b in batches:
        s_sps = mean_std(per_seed("sync", b, "samples_per_s"))["mean"]
        l_sps = mean_std(per_seed("local", b, "samples_per_s"))["mean"]
        ratios[f"b={b}"] = None if not (s_sps and l_sps) else s_sps / l_sps
        # throughput is measured also in a diverged run: no ranking, only the spread
        cost = exceeds_spread(
            per_seed("local", b, "samples_per_s"),
            per_seed("sync", b, "samples_per_s"),
            [False] * len(seeds),
            [False] * len(seeds),
        )
        slower[f"b={b}"] = cost["diff"] is not None and cost["diff"] > 0 and cost["exceeds"]
        sps_spread[f"b={b}"] = cost["spread"]
    claims.append(
        Claim(
            id="sync-costs-throughput",
            statement="synchronized BN lowers training throughput at every per-replica batch "
            "measured, by more than the seed-to-seed spread",
            verdict=all(slower.values()),
            measured={
                "throughput_ratio_sync_over_local": ratios,
                "slower_beyond_spread": slower,
                "spread_samples_per_s": sps_spread,
                **(
                    {"spread_note": "unknown with one seed: any difference passes"}
                    if len(seeds) < 2
                    else {}
                ),
            },
            source=SOURCE,
            seeds=seeds,
            details=f"global samples/s over steps {cfg.warmup}..{cfg.steps} (mean over seeds), "
            f"{cfg.world} processes with one thread each on one machine; "
            f"{spread_rule(len(seeds), 'std(local) + std(sync) of samples/s')}; supported if "
            "local - sync samples/s > spread at every per-replica batch",
        )
    )
    n_bn = res["sync", b0][0]["bn_layers"]

    def every_replica(arm: str) -> list[float]:
        # (a part saved before the per-replica counts were kept holds rank 0's)
        return [
            c
            for b in batches
            for r in res[arm, b]
            for c in r.get("rank_bn_collectives_per_step", [r["bn_collectives_per_step"]])
            if c is not None
        ]

    sync_counts, local_counts = every_replica("sync"), every_replica("local")
    claims.append(
        Claim(
            id="two-collectives-per-layer",
            statement="synchronized BN adds exactly 2 collectives per BN layer per step (one in "
            "the forward, one in the backward); per-replica BN adds none",
            verdict=all(c == 2 * n_bn for c in sync_counts) and all(c == 0 for c in local_counts),
            measured={
                "bn_layers": n_bn,
                "sync_per_step": sorted(set(sync_counts)),
                "local_per_step": sorted(set(local_counts)),
                "ddp_allreduces_per_step": sorted(
                    {
                        c
                        for arm in ARMS
                        for b in batches
                        for c in per_seed(arm, b, "ddp_allreduces_per_step")
                    }
                ),
            },
            source=SOURCE,
            seeds=seeds,
            details="all_gather calls counted in every replica over the timed steps; supported "
            "if every synchronized run makes exactly 2 x bn_layers per step and every "
            "per-replica run none",
        )
    )
    sync_diff = max(arms[f"sync/b={b}"]["running_stats_max_diff"] for b in batches)
    local_diff = min(arms[f"local/b={b}"]["running_stats_max_diff"] for b in batches)
    claims.append(
        Claim(
            id="identical-running-stats",
            statement="synchronized BN keeps the running statistics identical on every rank; "
            "with per-replica BN they differ",
            verdict=sync_diff == 0.0 and local_diff > 0.0,
            measured={"sync_max_abs_diff": sync_diff, "local_min_of_max_abs_diff": local_diff},
            source=SOURCE,
            seeds=seeds,
            details="largest |running stat(rank r) - running stat(rank 0)| after training "
            "(non-finite statistics count as +inf); supported if it is 0 for synchronized BN "
            "at every batch and > 0 for per-replica BN at every batch",
        )
    )
    series = {
        "world": cfg.world,
        "batches": batches,
        "accuracy": {a: [per_seed(a, b, "accuracy") for b in batches] for a in ARMS},
        "samples_per_s": {a: [per_seed(a, b, "samples_per_s") for b in batches] for a in ARMS},
    }
    summary = {"dataset": ds.info(), "world": cfg.world, "arms": arms, "claims": claims}
    return Results(rows=rows, summary=summary, series=series)
