"""DIM pretraining on unlabelled crystals: the loop, its label-free monitors and stopping
rules, and its checkpoints.

The loop talks to the outside world only through :mod:`matbench_dim.training.callbacks`:
tracking, pruning, early stopping and checkpoints are callbacks passed in by the caller.
Randomness comes from generators seeded by ``(seed, epoch)``, so a run resumed from a
checkpoint draws the same batches and samples as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from matbench_dim.features.featurize import CrystalRecord, collate
from matbench_dim.model.dim import DIMConfig, DIMObjective, participation_ratio
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder
from matbench_dim.training.callbacks import Callback, StopTraining, TrainingState, call_hook
from matbench_dim.training.common import (
    OptimizerConfig,
    check_loop,
    clip_grad,
    config_fingerprint,
    epoch_seed,
    make_batches,
    mean_logs,
    records_fingerprint,
    split_train_val,
)
from matbench_dim.training.precision import mixed_precision, to_device

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class PretrainConfig:
    """DIM pretraining loop settings.

    Attributes
    ----------
    epochs
        Maximum epochs over the pretraining pool.
    batch_sites
        Unique sites per batch (the seed batches 1,200).
    val_fraction
        Fraction of the (unlabelled) pool held out to select the best epoch by the DIM loss.
    patience
        Epochs without improvement before stopping (0: never); what must improve is set by
        ``stop``.
    grad_clip
        Maximum gradient norm of each stage (local, global, probes), clipped separately so
        that no stage rescales another's step (0: no clipping).
    stop
        The label-free stopping rule. ``"dim_loss"``: stop when the validation DIM loss has
        not improved for ``patience`` epochs. ``"critic_plateau"``: stop when the local
        critic's validation accuracy has not risen by more than 0.005 for ``patience``
        epochs *and* the effective rank of the local means is back at or above the random
        encoder's (DIM first collapses the local stage, then recovers it; see
        :func:`critic_plateau_reached`). Both read only the unlabelled validation slice;
        the kept encoder is the epoch of lowest validation DIM loss either way.
    """

    epochs: int = 30
    batch_sites: int = 1200
    val_fraction: float = 0.05
    patience: int = 10
    grad_clip: float = 10.0
    stop: str = "dim_loss"

    def __post_init__(self) -> None:
        check_loop(self, "pretrain")
        if self.stop not in STOP_RULES:
            raise ValueError(f"pretrain stop must be one of {STOP_RULES}, got {self.stop!r}")


STOP_RULES = ("dim_loss", "critic_plateau")
PLATEAU_MIN_GAIN = 0.005
"""Smallest rise of the local critic's validation accuracy that counts as progress."""


def critic_plateau_reached(
    history: Sequence[dict[str, float]], patience: int, min_gain: float = PLATEAU_MIN_GAIN
) -> bool:
    """The ``"critic_plateau"`` rule on a pretraining history (label-free logs only).

    True when the last ``patience`` epochs raised ``val_acc_local`` by no more than
    ``min_gain`` over its best before them, and the last epoch's ``val_pr_local`` is at
    least ``ref_pr_local`` (the random encoder's effective rank). False while either is
    missing (no validation slice) or fewer than ``patience + 1`` epochs have run.
    """
    if patience < 1 or len(history) <= patience:
        return False
    acc = [h.get("val_acc_local") for h in history]
    if any(a is None for a in acc):
        return False
    before = max(acc[:-patience])
    plateau = max(acc[-patience:]) <= before + min_gain
    last = history[-1]
    if "val_pr_local" not in last or "ref_pr_local" not in last:
        return False
    return plateau and last["val_pr_local"] >= last["ref_pr_local"]


def _clip_stages(optimizers: dict[str, torch.optim.Optimizer], max_norm: float) -> None:
    """Clip the gradient norm of each optimiser's parameters on their own.

    One norm over every stage would let one stage's gradients rescale another's step; in
    particular the property probe's gradients (from labels) would rescale the encoder's DIM
    steps. Each stage (local, global, probes) is clipped separately, so the DIM stages never
    see the probes.
    """
    for opt in optimizers.values():
        clip_grad([p for g in opt.param_groups for p in g["params"]], max_norm)


@dataclass
class PretrainResult:
    """The outcome of :func:`pretrain_dim`."""

    encoder: SiteNetEncoder
    objective: DIMObjective
    history: list[dict[str, float]]
    best_epoch: int
    n_train: int
    n_val: int
    wall_s: float
    resumed_from_epoch: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file + rename) with :func:`torch.save`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class PretrainCheckpoint(Callback):
    """Save the pretraining state after every ``every`` epochs, so an interrupted run resumes.

    The file holds state dicts and plain numbers only (loaded with ``weights_only=True``).
    """

    def __init__(self, path: str | os.PathLike[str], every: int = 1) -> None:
        self.path = Path(path)
        self.every = every

    def on_epoch_end(
        self, stage: str, epoch: int, logs: dict[str, float], state: TrainingState
    ) -> None:
        if stage != "pretrain" or (epoch + 1) % self.every:
            return
        extra = state.extra
        payload = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": extra["fingerprint"],
            "epoch": epoch,
            "history": state.history,
            "encoder": state.model.state_dict(),
            "objective": extra["objective"].state_dict(),
            "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
            "best": extra["best"],
        }
        save_checkpoint(self.path, payload)
        logger.debug("pretraining checkpoint written: %s (epoch %d)", self.path, epoch)


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file from a crash: start over, but say so
        logger.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return None
    if ckpt.get("version") != CHECKPOINT_VERSION or ckpt.get("fingerprint") != fingerprint:
        logger.warning(
            "checkpoint %s belongs to another configuration or data set; starting afresh", path
        )
        return None
    return ckpt


def pretrain_dim(
    records: Sequence[CrystalRecord],
    *,
    encoder_cfg: EncoderConfig,
    dim_cfg: DIMConfig,
    optimizer_cfg: OptimizerConfig,
    cfg: PretrainConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
    callbacks: Sequence[Callback] = (),
    probe_targets: np.ndarray | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
    precision: str = "fp32",
) -> PretrainResult:
    """Deep InfoMax pretraining of a fresh Site-Net encoder on unlabelled crystals.

    Parameters
    ----------
    records
        Featurized crystals of the pretraining pool (no labels are used).
    encoder_cfg, dim_cfg, optimizer_cfg, cfg
        Encoder, objective, optimiser and loop settings.
    seed
        Seeds the initial weights, the validation split, batch order and samples.
    device
        Torch device.
    callbacks
        Hooks called each epoch (tracking, pruning, checkpointing, early stopping).
    probe_targets
        Optional ``(n,)`` labels for the detached property probe (NaN = unlabelled); they
        are only logged, never used for model selection.
    checkpoint_path
        When given, the state is saved there after every epoch and a matching checkpoint
        found at start is resumed.
    progress
        Show a tqdm bar over epochs.
    precision
        :func:`~matbench_dim.training.precision.mixed_precision` setting of the training
        steps (``"auto"``: bf16/fp16 autocast on CUDA, float32 on CPU); validation and the
        monitors run in float32.

    Returns
    -------
    PretrainResult
        The encoder with the weights of the epoch with the lowest validation DIM loss (the
        last epoch when there is no validation split).

    Notes
    -----
    Label-free monitors in every epoch's logs (``val_`` on the held-out slice of the pool,
    ``train_`` averaged over the epoch's batches): the critics' accuracy on the positives
    and on each kind of negative (``*_acc_local_pos``, ``*_acc_local_neg_row``, ...,
    ``*_acc_global_neg_permuted``) and, on the validation slice, the participation ratio
    (effective rank) of the pooled local means and of the crystals' ``G``
    (``val_pr_local``, ``val_pr_global``). ``ref_pr_local`` and ``ref_pr_global`` are the
    same ratios for the freshly initialised (random) encoder, computed once before training
    and repeated in every epoch's logs as the reference.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    amp = mixed_precision(device, precision)
    if len(records) < 2:
        raise ValueError(
            f"DIM pretraining needs at least 2 crystals (negatives), got {len(records)}"
        )
    torch.manual_seed(seed)
    encoder = SiteNetEncoder(encoder_cfg).to(device)
    objective = DIMObjective(dim_cfg, encoder_cfg).to(device)
    optimizers = {
        "local": optimizer_cfg.make(
            list(encoder.local.parameters()) + objective.local_parameters()
        ),
        "global": optimizer_cfg.make(
            list(encoder.global_.parameters()) + objective.global_parameters()
        ),
        "probes": optimizer_cfg.make(objective.probe_parameters(), lr=1e-3),
    }
    train_idx, val_idx = split_train_val(len(records), cfg.val_fraction, seed)
    val_batches = make_batches(records, val_idx, cfg.batch_sites, None) if len(val_idx) else []
    # the random encoder's effective ranks, the reference of the label-free monitors (from
    # the seeded initial weights, so a resumed run computes the same values)
    reference = {
        f"ref_{k}": v
        for k, v in _representation_monitors(encoder, records, val_batches, device).items()
    }
    targets = None
    if probe_targets is not None:
        targets = np.asarray(probe_targets, dtype=float)
        if targets.shape != (len(records),):
            raise ValueError("probe_targets must have one entry per pretraining record")
        known = np.isfinite(targets)
        mu = float(targets[known].mean()) if known.any() else 0.0
        sd = float(targets[known].std()) if known.sum() > 1 else 1.0
        targets = (targets - mu) / (sd or 1.0)
        probe_scale = sd or 1.0
    fingerprint = config_fingerprint(
        encoder_cfg, dim_cfg, optimizer_cfg, cfg, seed, records_fingerprint(records)
    )
    best: dict[str, Any] = {"epoch": -1, "value": math.inf, "encoder": None}
    history: list[dict[str, float]] = []
    start = 0
    ckpt_path = Path(checkpoint_path) if checkpoint_path else None
    resumed = -1
    if ckpt_path is not None:
        from matbench_dim.paths import check_writable

        # an unusable folder fails now, not after the first (possibly hour-long) epoch
        check_writable(ckpt_path.parent, min_free_bytes=0)
        ckpt = _load_checkpoint(ckpt_path, fingerprint)
        if ckpt is not None:
            encoder.load_state_dict(ckpt["encoder"])
            objective.load_state_dict(ckpt["objective"])
            for k, o in optimizers.items():
                o.load_state_dict(ckpt["optimizers"][k])
            history = list(ckpt["history"])
            best = ckpt["best"]
            start = resumed = int(ckpt["epoch"]) + 1
            logger.info("resuming DIM pretraining from %s at epoch %d", ckpt_path, start)
    # the checkpoint goes first, so an epoch is saved before another callback can stop the run
    cbs = ([PretrainCheckpoint(ckpt_path)] if ckpt_path is not None else []) + list(callbacks)
    state = TrainingState(
        "pretrain",
        encoder,
        optimizers,
        epoch=start - 1,
        history=history,
        extra={
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "seed": seed,
            "objective": objective,
            "fingerprint": fingerprint,
            "best": best,
            **reference,
        },
    )
    call_hook(cbs, "on_train_begin", "pretrain", state)
    skipped_single = 0
    bar = tqdm(range(start, cfg.epochs), desc="DIM pretraining", unit="epoch", disable=not progress)
    try:
        for epoch in bar:
            t_epoch = time.perf_counter()
            gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            encoder.train()
            objective.train()
            rows, sizes = [], []
            for b_idx in make_batches(records, train_idx, cfg.batch_sites, epoch_seed(seed, epoch)):
                if len(b_idx) < 2:
                    skipped_single += 1
                    continue  # DIM needs another crystal in the batch for its negatives
                batch = to_device(collate(records, b_idx), device)
                t = (
                    None
                    if targets is None
                    else torch.as_tensor(targets[b_idx], dtype=torch.float32, device=device)
                )
                with amp.autocast():
                    out = objective(encoder, batch, gen, t)
                for o in optimizers.values():
                    o.zero_grad(set_to_none=True)
                amp.backward(out["loss"])
                amp.unscale(optimizers.values())
                _clip_stages(optimizers, cfg.grad_clip)
                amp.step(optimizers.values())
                rows.append({k: float(v) for k, v in out.items() if k != "loss"})
                sizes.append(len(b_idx))
            logs = mean_logs(rows, sizes, "train_")
            if val_batches:
                logs.update(
                    _evaluate_dim(encoder, objective, records, val_batches, targets, seed, device)
                )
                monitors = _representation_monitors(encoder, records, val_batches, device)
                logs.update({f"val_{k}": v for k, v in monitors.items()})
                logs.update(reference)
            if targets is not None:
                for k in list(logs):
                    if k.endswith("probe_property_mae"):
                        logs[k] *= probe_scale
            monitor = logs.get("val_dim_loss", logs.get("train_dim_loss", math.inf))
            if monitor < best["value"]:
                best = {
                    "epoch": epoch,
                    "value": monitor,
                    "encoder": copy.deepcopy(
                        {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
                    ),
                }
                state.extra["best"] = best
            logs["epoch_time_s"] = time.perf_counter() - t_epoch  # this epoch, validation included
            history.append(logs)
            state.epoch = epoch
            bar.set_postfix(dim=f"{monitor:.4f}")
            call_hook(cbs, "on_epoch_end", "pretrain", epoch, logs, state)
            if cfg.stop == "dim_loss" and cfg.patience and epoch - best["epoch"] >= cfg.patience:
                logger.info(
                    "DIM pretraining stopped at epoch %d (no improvement for %d)",
                    epoch,
                    cfg.patience,
                )
                break
            if cfg.stop == "critic_plateau" and critic_plateau_reached(history, cfg.patience):
                logger.info(
                    "DIM pretraining stopped at epoch %d: local critic on a plateau for %d "
                    "epochs, local effective rank %.2f >= the random encoder's %.2f",
                    epoch, cfg.patience, logs["val_pr_local"], logs["ref_pr_local"],
                )  # fmt: skip
                break
    except StopTraining:
        logger.info("DIM pretraining stopped by a callback at epoch %d", state.epoch)
    except BaseException as exc:
        call_hook(cbs, "on_exception", "pretrain", state, exc)
        raise
    finally:
        bar.close()
    if skipped_single:
        logger.debug("skipped %d single-crystal batches (no in-batch negatives)", skipped_single)
    if best["encoder"] is not None:
        encoder.load_state_dict(best["encoder"])
    call_hook(cbs, "on_train_end", "pretrain", state)
    return PretrainResult(
        encoder.cpu().eval(),
        objective.cpu().eval(),
        history,
        int(best["epoch"]),
        len(train_idx),
        len(val_idx),
        time.perf_counter() - t0,
        resumed,
        {"reference": reference},
    )


def _representation_monitors(
    encoder: SiteNetEncoder,
    records: Sequence[CrystalRecord],
    batches: list[np.ndarray],
    device: torch.device,
) -> dict[str, float]:
    """Participation ratios of the local means (pooled over all sites) and of ``G`` (means,
    no sampling) over the crystals of ``batches``; empty when there are none. A ratio that
    is undefined (fewer than two vectors, no spread: e.g. one validation crystal) is left
    out, so every logged value is finite."""
    if not batches:
        return {}
    was_training = encoder.training
    encoder.eval()
    local, glob = [], []
    with torch.no_grad():
        for b_idx in batches:
            out = encoder(collate(records, b_idx).to(device))
            local.append(out.local_mu[out.site_mask].cpu())
            glob.append(out.global_mu.cpu())
    encoder.train(was_training)
    ratios = {
        "pr_local": participation_ratio(torch.cat(local)),
        "pr_global": participation_ratio(torch.cat(glob)),
    }
    return {k: v for k, v in ratios.items() if math.isfinite(v)}


def _evaluate_dim(
    encoder: SiteNetEncoder,
    objective: DIMObjective,
    records: Sequence[CrystalRecord],
    batches: list[np.ndarray],
    targets: np.ndarray | None,
    seed: int,
    device: torch.device,
) -> dict[str, float]:
    encoder.eval()
    objective.eval()
    gen = torch.Generator().manual_seed(epoch_seed(seed, -1))
    rows, sizes = [], []
    with torch.no_grad():
        for b_idx in batches:
            if len(b_idx) < 2:
                continue
            batch = collate(records, b_idx).to(device)
            t = (
                None
                if targets is None
                else torch.as_tensor(targets[b_idx], dtype=torch.float32, device=device)
            )
            out = objective(encoder, batch, gen, t)
            rows.append({k: float(v) for k, v in out.items() if k != "loss"})
            sizes.append(len(b_idx))
    return mean_logs(rows, sizes, "val_")
