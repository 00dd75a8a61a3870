"""``run(config) -> RunResult``: one training run, a pure function of its resolved config and seed.

data (class-disjoint splits, P×K batches) → model → loss (+ miner, synthesis) + regularizers + model
aux losses → validation every ``train.eval_every`` epochs (model selection on validation classes
only) → test metrics of the best-on-validation state and of the last state (unless ``eval.test`` is
off, as in tune trials).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness import distributed
from harness.config import RunConfig
from harness.data import build_transforms, load_splits
from harness.data.batch_augment import build_batch_augment, build_cached_crop
from harness.data.cache import cached_splits, num_workers
from harness.data.prefetch import ThreadedLoader, received_in_thread
from harness.data.sampler import build_sampler
from harness.distributed import SINGLE, Dist, ShardedBatches
from harness.errors import ConfigError, TrainingError
from harness.evaluate import retrieval_metrics
from harness.learner import Learner, check_assembly, embed
from harness.logs import progress_bar
from harness.model import StagedBackbone, build_component
from harness.monitor import READ_EVERY, CollapseCheck, Progress, StepStats, inert_synthesis
from harness.plugins import (
    AttentionMaps,
    Ensemble,
    EpochDiagnostics,
    SplitMiner,
    TripletBatches,
)
from harness.reporting import embeddings as reporting_embeddings
from harness.types import CLUSTERING_METRICS, recall_name

log = logging.getLogger(__name__)

Reporter = Callable[[int, dict[str, float]], None]


@dataclass
class RunResult:
    """Everything a run produced; ``metrics`` keys are ``val/…``, ``test/…`` (best-on-val state),
    ``test_last/…`` (last epoch), for an ensemble ``test_learner<m>/…`` (its learners, as ``test/…``), and
    ``data/val_classes`` (how many classes validated). Without ``eval.test`` (tune trials) no test metric."""

    config: dict[str, Any]
    run_key: str
    metrics: dict[str, float]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    #: The final test evaluation's neighbours and embedding sample (``harness.reporting.embeddings``).
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    #: How the reported ``test/…`` state was chosen: ``best_val`` or ``last`` (no validation split).
    selection: str = "best_val"
    #: What a reader of the results must know (a collapsed embedding, ...), also logged as warnings.
    warnings: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


class _Trainer:
    """The state of one run; ``run`` below is its only user."""

    def __init__(self, cfg: RunConfig, dist: Dist = SINGLE):
        self.cfg, self.dist = cfg, dist
        self.device = dist.place(pick_device(cfg.train.device))
        self.splits = load_splits(cfg.data)
        num_classes = self.splits.num_train_classes
        self.learner = Learner.build(cfg, num_classes, self.splits.channels, self.device)
        if dist.active:  # global-batch statistics; every replica starts from rank 0's weights
            self.learner.model = distributed.sync_batchnorm(self.learner.model, self.device, dist.world_size)
            self.learner.global_batch = dist.global_batch
            dist.broadcast_modules(self.learner.model, self.learner.loss, self.learner.regularizers)
        self.model, self.loss, self.regularizers = (
            self.learner.model,
            self.learner.loss,
            self.learner.regularizers,
        )
        self.optimizer = self.learner.optimizer
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        backbone = cast(StagedBackbone, self.model.backbone)
        train_tf, test_tf = build_transforms(cfg.data, backbone.data_config, self.splits.channels)
        self.splits = cached_splits(self.splits, cfg.data, backbone.data_config)
        self.num_workers = num_workers(cfg.data, self.splits) // dist.world_size  # the ranks share the CPUs
        self.augment = build_batch_augment(
            cfg.data, backbone.data_config, self.splits.train, self.device, cfg.seed
        )
        # else the workers crop cached images on uint8 (batch_augment.CachedCrop; normalised here, batched)
        self.crops = (
            None if self.augment else build_cached_crop(cfg.data, backbone.data_config, self.splits.train)
        )
        worker_tf = self.augment.canvas if self.augment else self.crops
        self.train_set = self.splits.train.with_transform(worker_tf or train_tf)
        self.eval_sets = {
            name: s.with_transform(test_tf)
            for name, s in (
                ("train", self.splits.train),
                ("val", self.splits.val),
                ("test", self.splits.test),
                ("query", self.splits.query),
            )
            if s is not None and (cfg.eval.test or name in ("train", "val"))
        }
        self.scheduler = (
            build_component(
                cfg.scheduler, "scheduler", "scheduler", optimizer=self.optimizer, epochs=cfg.train.epochs
            )
            if cfg.scheduler
            else None
        )
        self.sampler = build_sampler(cfg.sampler, self.splits.train.labels, cfg.seed)
        # every rank draws the same global batches and loads its contiguous shard of each
        shard = ShardedBatches(self.sampler, dist.rank, dist.world_size) if dist.active else self.sampler
        loader = torch.utils.data.DataLoader(
            self.train_set,
            batch_sampler=shard,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.device.type == "cuda",
        )
        self.loader: DataLoader | ThreadedLoader = received_in_thread(loader, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.learner.grad_scaling)  # not for bfloat16

    def train_epoch(self, epoch: int, progress: Progress) -> dict[str, float]:
        self.model.train()
        self.loss.train()
        self.regularizers.train()
        warm = epoch < self.cfg.train.warmup_epochs
        for p in cast(nn.Module, self.model.backbone).parameters():
            p.requires_grad_(not warm)
        self.sampler.set_epoch(epoch)
        meter = StepStats(epoch)
        progress.begin_epoch()
        bar = progress_bar(self.loader, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", leave=False)
        for step, (images, labels) in enumerate(bar):
            images = images.to(self.device, non_blocking=True)
            if self.augment is not None:
                images = self.augment(images)
            elif self.crops is not None:  # uint8 crops of the workers
                images = self.crops.normalise(images)
            labels = torch.as_tensor(labels).to(self.device, non_blocking=True)
            total, stats = self.learner.objective(images, labels)
            meter.add(step, total, stats)  # no host read: a NaN is found at the next read, with its step
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.dist.average_gradients(self.params)  # over the ranks of a DDP run
            if self.cfg.train.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_value_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.train.grad_clip
                )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if (step + 1) % READ_EVERY == 0:
                bar.set_postfix(loss=f"{meter.read()['loss']:.4f}")
            images_seen, loss = len(labels) * self.dist.world_size, meter.last.get("loss", math.nan)
            progress.step(epoch, step + 1, loss, images_seen, bar_shown=not bar.disable)  # loss as last read
        means = meter.read()
        if self.scheduler is not None:
            self.scheduler.step()
        return {f"train/{k}": v for k, v in means.items()}

    def refresh_triplets(self, epoch: int) -> dict[str, float]:
        """Offline mining (``plugins.SplitMiner``): on the epochs its ``refresh_every`` says (0, N, 2N, ...),
        embed the training split (eval mode, test transform), let the miner pick triplets from it and hand
        them to the sampler. Returns the history columns ``mining_s`` (embedding + mining; 0 between
        refreshes) and the miner's ``mining/...`` statistics; nothing without an offline miner."""
        miner = self.learner.miner
        if not isinstance(miner, SplitMiner):
            return {}
        if epoch % miner.refresh_every:
            return {"mining_s": 0.0}
        t = time.perf_counter()
        emb, labels = self.embed_split("train", desc="embed train (mining)")
        rng = np.random.default_rng([self.cfg.seed % 2**32, epoch, 1])  # not the sampler's stream
        triplets, stats = miner.mine_split(emb, labels, rng)
        assert isinstance(self.sampler, TripletBatches), "config.validate pairs an offline miner with it"
        self.sampler.set_triplets(triplets, epoch)
        return {"mining_s": time.perf_counter() - t, **{f"mining/{k}": v for k, v in stats.items()}}

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        """Retrieval metrics of ``split`` (val or test; In-Shop test searches query → gallery)."""
        ev = self.cfg.eval

        def emb(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            return self.embed_split(name, desc=f"embed {name}")

        gallery, g_labels = emb(split)
        query, q_labels = emb("query") if split == "test" and "query" in self.eval_sets else (None, None)
        self.raw_embedded = (gallery, query)  # unwhitened, for the learners' own metrics
        if ev.whitening is not None:
            train_emb, train_labels = emb("train")
            whiten = build_component(ev.whitening, "whitening", "eval.whitening").fit(train_emb, train_labels)
            gallery = whiten(gallery)
            query = whiten(query) if query is not None else None
        self.embedded = (gallery, g_labels, query, q_labels)  # for the report (run() keeps them)
        # k-means is the slowest metric (minutes on SOP): on validation only when it selects the epoch
        nmi = ev.nmi and (split == "test" or self.cfg.train.selection_metric in CLUSTERING_METRICS)
        return self.retrieval(gallery, query, nmi)

    def embed_split(self, name: str, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of split ``name`` in order (each rank of a DDP run embeds a shard)."""
        ev = self.cfg.eval

        def embed_set(dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
            return embed(self.model, dataset, ev.batch_size, self.device, self.num_workers, desc=desc)

        dim = int(getattr(self.model, "embedding_dim", 0))
        self.dist.broadcast_buffers(self.model)
        return self.dist.embed(embed_set, self.eval_sets[name], ev.batch_size, dim)

    def retrieval(self, gallery: torch.Tensor, query: torch.Tensor | None, nmi: bool) -> dict[str, float]:
        """``retrieval_metrics`` of embeddings of the last evaluated split (its labels), as ``eval`` asks;
        computed once (rank 0 of a DDP run, every rank gets them)."""
        ev, (_, g_labels, _, q_labels) = self.cfg.eval, self.embedded
        return self.dist.on_main(
            lambda: retrieval_metrics(
                gallery,
                g_labels,
                ks=tuple(ev.ks),
                query_embeddings=query,
                query_labels=q_labels,
                distance=ev.distance,
                backend=ev.backend,
                nmi=nmi,
            )
        )

    def learner_metrics(self) -> dict[str, float]:
        """Recall@K and MAP@R of each learner of an ensemble (``plugins.Ensemble``) alone, on its columns of
        the last evaluated split's unwhitened embeddings (each learner's part is unit-norm already), keyed
        ``learner<m>/<metric>`` (m from 1); none for other models. No k-means: the tables show neither."""
        if not isinstance(self.model, Ensemble):
            return {}
        keep = {*map(recall_name, self.cfg.eval.ks), "map@r"}
        gallery, query = self.raw_embedded
        out: dict[str, float] = {}
        for m, cols in enumerate(self.model.learner_columns(), 1):
            got = self.retrieval(gallery[:, cols], None if query is None else query[:, cols], nmi=False)
            out |= {f"learner{m}/{k}": v for k, v in got.items() if k in keep}
        return out

    def epoch_diagnostics(self) -> tuple[dict[str, float], dict[str, Any]]:
        """Collect every component's ``epoch_diagnostics()``: scalars for the history, the rest as records."""
        scalars: dict[str, float] = {}
        records: dict[str, Any] = {}
        for root in (self.model, self.loss, self.regularizers):
            for m in root.modules():
                if not isinstance(m, EpochDiagnostics):
                    continue
                source = type(m).__name__
                for k, v in m.epoch_diagnostics().items():
                    v = v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else v
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        scalars[f"diag/{k}"] = float(v)
                    else:
                        records[f"{source}/{k}"] = v
        return scalars, records

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "loss": self.loss.state_dict(),
                "regularizers": self.regularizers.state_dict(),
            }
        )

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.regularizers.load_state_dict(state["regularizers"])


def run(config: RunConfig, reporter: Reporter | None = None) -> RunResult:
    """Train and evaluate ``config``. ``reporter(epoch, val_metrics)`` is called after every validation
    and may raise (e.g. optuna.TrialPruned) to stop the run.

    With ``train.distributed.world_size`` > 1 the run trains in that many processes it spawns (DDP,
    ``harness.distributed``); started by torchrun, this process is one rank. Either way the caller gets
    rank 0's result (under torchrun every rank returns its own; only rank 0's caller should write it)."""
    cfg = config
    world = cfg.train.distributed.world_size
    if distributed.from_env():
        with distributed.env_process_group(cfg) as dist:
            return _run(cfg, reporter, dist)
    # config-only problems that assembling the model shows (a stage name, a component combination) are
    # reported before any image is read, not after the image check and the cache (built once per config)
    problems = distributed.batch_problems(cfg.sampler, world) or check_assembly(cfg)
    if problems:
        raise ConfigError(problems)
    if world == 1:
        return _run(cfg, reporter, SINGLE)
    backend = distributed.resolve_backend(cfg.train.distributed.backend, cfg.train.device)
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise TrainingError(
            f"train.distributed.world_size: {world} ranks need {world} GPUs, "
            f"{torch.cuda.device_count()} visible"
        )
    return cast(
        RunResult,
        distributed.launch(
            _rank_run, (cfg.to_dict(),), world, backend, cfg.train.distributed.timeout_s, reporter
        ),
    )


def _rank_run(dist: Dist, raw: dict[str, Any]) -> RunResult:
    """One spawned rank of a DDP run (``raw``: the resolved config); rank 0's reporter asks the caller's
    (``distributed.launch``)."""
    cfg = RunConfig.model_validate(raw)
    reporter = (lambda epoch, val: distributed.ask_parent(dist, epoch, val)) if dist.is_main else None
    return _run(cfg, reporter, dist)


def _run(cfg: RunConfig, reporter: Reporter | None, dist: Dist) -> RunResult:
    t0 = time.perf_counter()
    threads = dist.threads(cfg.train.threads)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    tr = _Trainer(cfg, dist)
    has_val = "val" in tr.eval_sets
    log.info(
        "run %s: %d train / %s val / %s test images, %d train classes, device %s",
        cfg.name,
        len(tr.train_set),
        len(tr.eval_sets["val"]) if has_val else 0,
        len(tr.eval_sets["test"]) if cfg.eval.test else "no (eval.test: false)",
        tr.splits.num_train_classes,
        tr.device,
    )
    if not has_val:
        log.info("run %s: no validation split (data.val_fraction: 0): the last epoch is reported", cfg.name)
    margin = cfg.to_dict()["loss"].get("margin")
    collapse = CollapseCheck(margin=float(margin) if isinstance(margin, (int, float)) else None)
    fit = _fit(tr, reporter, collapse, t0)
    t = time.perf_counter()
    metrics, saved = _final_test(tr, fit)
    metrics["train/collapsed"] = float(collapse.collapsed(cfg.train.epochs))
    if has_val:  # how many classes the selection rested on (the report warns below 5)
        metrics["data/val_classes"] = float(tr.eval_sets["val"].num_classes)
    eval_time = fit.eval_time + time.perf_counter() - t
    warnings = collapse.warnings(cfg.train.epochs)
    if cfg.synthesis:
        inert = inert_synthesis(fit.history)
        metrics["train/synthesis_inert"] = float(inert is not None)
        warnings += [inert] if inert else []
    for w in warnings:
        log.warning("run %s: %s", cfg.name, w)
    return RunResult(
        config=cfg.to_dict(),
        run_key=cfg.run_key(),
        metrics=metrics,
        best_epoch=fit.best_epoch,
        history=fit.history,
        diagnostics=fit.diagnostics,
        timings={
            "total_s": time.perf_counter() - t0,
            "train_s": fit.train_time,
            "eval_s": eval_time,
            "mining_s": fit.mining_time,
            # a training epoch (offline mining included) and its mining, on average: the report's time columns
            "epoch_s": (fit.train_time + fit.mining_time) / max(cfg.train.epochs, 1),
            "mining_epoch_s": fit.mining_time / max(cfg.train.epochs, 1),
            # training images per second of the training loop (data waits included, offline mining not)
            "images_per_s": sum(h["images_per_s"] * h["train_s"] for h in fit.history)
            / max(fit.train_time, 1e-9),
        },
        checkpoint=fit.best_state if fit.best_state is not None else tr.state(),
        embeddings=saved,
        selection="best_val" if has_val else "last",
        warnings=warnings,
    )


def _final_test(tr: _Trainer, fit: _Fit) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The run's metrics: validation of the selected epoch, test of the last and of the best-on-validation
    state (``test/…``, what tables report) and of each of its learners (``test_learner<m>/…``), the best
    test epoch where asked (labelled ``test_best/…``), and what the report keeps of the reported state's
    test embeddings (plus ABE's attention masks)."""
    cfg = tr.cfg
    metrics = {f"val/{k}": v for k, v in fit.best_val.items()}
    if not cfg.eval.test:  # a tune trial: selected on validation classes, never embeds the test classes
        return metrics, {}
    last_test = tr.evaluate("test")
    metrics.update({f"test_last/{k}": v for k, v in last_test.items()})
    if fit.best_state is not None and fit.best_epoch != cfg.train.epochs:
        tr.load_state(fit.best_state)
        metrics.update({f"test/{k}": v for k, v in tr.evaluate("test").items()})
    else:
        metrics.update({f"test/{k}": v for k, v in last_test.items()})
    metrics.update({f"test_{k}": v for k, v in tr.learner_metrics().items()})  # test_learner<m>/…
    metrics.update({f"test_best/{k}": v for k, v in fit.best_test.items()})
    if fit.best_test_epoch is not None:
        metrics["test_best/epoch"] = float(fit.best_test_epoch)
    saved = reporting_embeddings.capture(*tr.embedded, tr.eval_sets, cfg.eval.distance)
    if isinstance(tr.model, AttentionMaps):  # the masks of the state the test metrics report
        saved |= reporting_embeddings.attention(tr.model, tr.eval_sets["test"], tr.device)
    return metrics, saved


@dataclass
class _Fit:
    """What the epochs of a run leave: history, diagnostics, the best-on-validation state, time spent."""

    best_epoch: int
    best_score: float = -math.inf
    best_state: dict[str, Any] | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    best_test: dict[str, float] = field(default_factory=dict)
    best_test_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    train_time: float = 0.0
    eval_time: float = 0.0
    mining_time: float = 0.0


def _fit(tr: _Trainer, reporter: Reporter | None, collapse: CollapseCheck, t0: float) -> _Fit:
    """Train every epoch, validating every ``train.eval_every``; one history row and log line per epoch
    with its training time, validation time and training images/s (and offline mining's time)."""
    cfg = tr.cfg
    selection = cfg.train.selection_metric
    fit = _Fit(best_epoch=cfg.train.epochs)
    progress = Progress(cfg.name, cfg.train.epochs, len(tr.sampler))
    for epoch in progress_bar(range(cfg.train.epochs), desc=f"{cfg.name}"):
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": tr.optimizer.param_groups[0]["lr"]}
        row.update(tr.refresh_triplets(epoch))
        fit.mining_time += row.get("mining_s", 0.0)
        t = time.perf_counter()
        row.update(tr.train_epoch(epoch, progress))
        row["train_s"] = time.perf_counter() - t
        row["images_per_s"] = progress.images / max(row["train_s"], 1e-9)
        fit.train_time += row["train_s"]
        scalars, records = tr.epoch_diagnostics()
        row.update(scalars)
        if records:
            fit.diagnostics.append({"epoch": epoch + 1, **records})
        collapse.update(row)
        row["eval_s"], val = 0.0, None
        last = epoch + 1 == cfg.train.epochs
        if "val" in tr.eval_sets and ((epoch + 1) % cfg.train.eval_every == 0 or last):
            t = time.perf_counter()
            val = tr.evaluate("val")
            row["eval_s"] = time.perf_counter() - t
            fit.eval_time += row["eval_s"]
            row.update({f"val/{k}": v for k, v in val.items()})
            if selection not in val:
                raise TrainingError(
                    f"train.selection_metric {selection!r} is not a metric (have {sorted(val)})"
                )
            if val[selection] > fit.best_score:
                fit.best_score, fit.best_epoch, fit.best_state = val[selection], epoch + 1, tr.state()
                fit.best_val = val
        every = cfg.train.best_test_every
        if every and ((epoch + 1) % every == 0 or last):  # test-set selection, labelled test_best/
            test = tr.evaluate("test")
            row.update({f"test_epoch/{k}": v for k, v in test.items()})
            if test.get(selection, -math.inf) > fit.best_test.get(selection, -math.inf):
                fit.best_test, fit.best_test_epoch = test, epoch + 1
        row["seconds"] = time.perf_counter() - t0
        fit.history.append(row)
        log.info("%s", progress.epoch_line(row, selection))
        if val is not None:  # rank 0 of a DDP run decides; every rank follows
            tr.dist.report(reporter, epoch + 1, val)
    return fit
