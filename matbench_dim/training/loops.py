"""Training loops: DIM pretraining on unlabelled crystals and supervised fine-tuning.

The loops talk to the outside world only through :mod:`matbench_dim.training.callbacks`: tracking,
pruning, early stopping and checkpoints are callbacks passed in by the caller. Randomness
comes from generators seeded by ``(seed, epoch)``, so a run resumed from a checkpoint draws
the same batches and samples as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from matbench_dim.features.featurize import CrystalRecord, batch_indices, collate
from matbench_dim.model.dim import DIMConfig, DIMObjective, participation_ratio
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder, SiteNetRegressorNet
from matbench_dim.training.callbacks import Callback, StopTraining, TrainingState, call_hook

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings (the seed's: lr 1e-4, weight decay 1e-4, eps 1e-7, amsgrad)."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    eps: float = 1e-7
    amsgrad: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optimizer lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("optimizer weight_decay must be >= 0 and eps > 0")

    def make(self, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
        """Build an AdamW optimiser over ``params`` (``lr`` overrides ``self.lr``)."""
        return torch.optim.AdamW(
            params,
            lr=lr if lr is not None else self.lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            amsgrad=self.amsgrad,
        )


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
        _check_loop(self, "pretrain")
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


@dataclass(frozen=True)
class FinetuneConfig:
    """Supervised fine-tuning settings.

    Attributes
    ----------
    epochs
        Maximum epochs over the labelled set.
    batch_sites
        Unique sites per batch (the seed uses 400 for n <= 250).
    val_fraction
        Fraction of the labelled set held out for the best-epoch choice and early stopping
        (at least one crystal when there are 4 or more labels; none below that).
    patience
        Epochs without improvement of the validation MAE before stopping (0: never).
    lr
        Fine-tuning learning rate (``None``: the optimizer's ``lr``).
    loss
        ``"mse"`` (the seed's fine-tuning loss) or ``"l1"``.
    head_hidden
        Hidden width of the regression head.
    freeze_encoder
        Train only the head (the representation use); the seed found freezing never helped
        in transfer.
    grad_clip
        Maximum gradient norm (0: no clipping).
    encoder_lr_scale
        The encoder's learning rate as a fraction of ``lr`` (the head always trains at ``lr``);
        1 trains the whole network at one rate, as the seed does.
    head_warmup_epochs
        Epochs that train only the head, with the encoder frozen, before the whole network is
        fine-tuned ("linear probing, then fine-tuning"; 0: none).
    """

    epochs: int = 300
    batch_sites: int = 400
    val_fraction: float = 0.2
    patience: int = 100
    lr: float | None = 3e-4
    loss: str = "mse"
    head_hidden: int = 64
    freeze_encoder: bool = False
    grad_clip: float = 10.0
    encoder_lr_scale: float = 1.0
    head_warmup_epochs: int = 0

    def __post_init__(self) -> None:
        _check_loop(self, "finetune")
        if not self.encoder_lr_scale > 0:
            raise ValueError(f"finetune encoder_lr_scale must be > 0, got {self.encoder_lr_scale}")
        if self.head_warmup_epochs < 0:
            raise ValueError(
                f"finetune head_warmup_epochs must be >= 0, got {self.head_warmup_epochs}"
            )
        if self.loss not in ("mse", "l1"):
            raise ValueError(f"finetune loss must be 'mse' or 'l1', got {self.loss!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"finetune lr must be > 0 or None, got {self.lr}")
        if self.head_hidden < 1:
            raise ValueError("finetune head_hidden must be >= 1")


def _check_loop(cfg: Any, name: str) -> None:
    if cfg.epochs < 1:
        raise ValueError(f"{name} epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_sites < 1:
        raise ValueError(f"{name} batch_sites must be >= 1, got {cfg.batch_sites}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"{name} val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.patience < 0 or cfg.grad_clip < 0:
        raise ValueError(f"{name} patience and grad_clip must be >= 0")


def split_train_val(
    n: int, val_fraction: float, seed: int, min_total_for_val: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train, validation) index arrays.

    The validation part has ``round(n * val_fraction)`` items, at least one when
    ``n >= min_total_for_val`` and ``val_fraction > 0``, none otherwise.
    """
    if val_fraction <= 0 or n < min_total_for_val:
        return np.arange(n), np.arange(0)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def _batches(
    records: Sequence[CrystalRecord], idx: np.ndarray, batch_sites: int, seed: int | None
) -> list[np.ndarray]:
    groups = batch_indices(
        [records[i].n_prim for i in idx], max_sites=batch_sites, shuffle=seed is not None, seed=seed
    )
    return [idx[np.asarray(g, dtype=int)] for g in groups]


def _mean_logs(rows: list[dict[str, float]], weights: list[int], prefix: str) -> dict[str, float]:
    if not rows:
        return {}
    w = np.asarray(weights, dtype=float)
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        vals = np.array([r.get(k, np.nan) for r in rows], dtype=float)
        ok = np.isfinite(vals)
        if ok.any():
            out[f"{prefix}{k}"] = float(np.average(vals[ok], weights=w[ok]))
    return out


def _clip(params: Any, max_norm: float) -> None:
    if max_norm > 0:
        nn.utils.clip_grad_norm_(params, max_norm)


def _clip_stages(optimizers: dict[str, torch.optim.Optimizer], max_norm: float) -> None:
    """Clip the gradient norm of each optimiser's parameters on their own.

    One norm over every stage would let one stage's gradients rescale another's step; in
    particular the property probe's gradients (from labels) would rescale the encoder's DIM
    steps. Each stage (local, global, probes) is clipped separately, so the DIM stages never
    see the probes.
    """
    for opt in optimizers.values():
        _clip([p for g in opt.param_groups for p in g["params"]], max_norm)


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


def _config_fingerprint(*parts: Any) -> str:
    blob = json.dumps(
        [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def records_fingerprint(records: Sequence[CrystalRecord]) -> str:
    """Content hash of a list of records (order-sensitive), used to key checkpoints."""
    h = hashlib.sha256()
    for r in records:
        h.update(np.ascontiguousarray(r.site_features).tobytes())
        h.update(np.ascontiguousarray(r.super_coords).tobytes())
        h.update(np.ascontiguousarray(r.lattice).tobytes())
    return h.hexdigest()[:16]


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
    val_batches = _batches(records, val_idx, cfg.batch_sites, None) if len(val_idx) else []
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
    fingerprint = _config_fingerprint(
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
            gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            encoder.train()
            objective.train()
            rows, sizes = [], []
            for b_idx in _batches(records, train_idx, cfg.batch_sites, _epoch_seed(seed, epoch)):
                if len(b_idx) < 2:
                    skipped_single += 1
                    continue  # DIM needs another crystal in the batch for its negatives
                batch = collate(records, b_idx).to(device)
                t = (
                    None
                    if targets is None
                    else torch.as_tensor(targets[b_idx], dtype=torch.float32, device=device)
                )
                out = objective(encoder, batch, gen, t)
                for o in optimizers.values():
                    o.zero_grad(set_to_none=True)
                out["loss"].backward()
                _clip_stages(optimizers, cfg.grad_clip)
                for o in optimizers.values():
                    o.step()
                rows.append({k: float(v) for k, v in out.items() if k != "loss"})
                sizes.append(len(b_idx))
            logs = _mean_logs(rows, sizes, "train_")
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
    gen = torch.Generator().manual_seed(_epoch_seed(seed, -1))
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
    return _mean_logs(rows, sizes, "val_")


def finetune(
    net: SiteNetRegressorNet,
    records: Sequence[CrystalRecord],
    y_scaled: np.ndarray,
    *,
    cfg: FinetuneConfig,
    optimizer_cfg: OptimizerConfig,
    target_scale: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
) -> tuple[list[dict[str, float]], int]:
    """Supervised training of ``net`` on standardised targets; restores the best epoch.

    Parameters
    ----------
    net
        Encoder + head; trained in place.
    records
        Featurized labelled crystals.
    y_scaled
        ``(n,)`` standardised targets.
    target_scale
        Standard deviation of the raw targets, to log MAEs in target units.
    seed, device, callbacks, progress
        As in :func:`pretrain_dim`.

    Returns
    -------
    tuple
        ``(history, best_epoch)``. Logs hold ``train_loss`` (scaled), ``train_mae`` and
        ``val_mae`` (target units) and ``val_loss`` (= ``val_mae``, what pruning and early
        stopping watch).
    """
    device = torch.device(device)
    net.to(device)
    y = torch.as_tensor(np.asarray(y_scaled, dtype=np.float32))
    train_idx, val_idx = split_train_val(len(records), cfg.val_fraction, seed + 1)
    lr = cfg.lr if cfg.lr is not None else optimizer_cfg.lr
    if cfg.freeze_encoder:
        params: Any = net.head.parameters()
        for p in net.encoder.parameters():
            p.requires_grad_(False)
    elif cfg.encoder_lr_scale != 1.0:
        params = [
            {"params": list(net.head.parameters())},
            {"params": list(net.encoder.parameters()), "lr": lr * cfg.encoder_lr_scale},
        ]
    else:
        params = net.parameters()
    opt = optimizer_cfg.make(params, lr=lr)
    loss_fn = nn.MSELoss() if cfg.loss == "mse" else nn.L1Loss()
    history: list[dict[str, float]] = []
    state = TrainingState(
        "finetune",
        net,
        {"finetune": opt},
        extra={"n_train": len(train_idx), "n_val": len(val_idx), "seed": seed},
    )
    cbs = list(callbacks)
    call_hook(cbs, "on_train_begin", "finetune", state)
    best = {"epoch": -1, "value": math.inf, "state": None}
    val_batches = _batches(records, val_idx, cfg.batch_sites, None) if len(val_idx) else []
    bar = tqdm(range(cfg.epochs), desc="fine-tuning", unit="epoch", disable=not progress)
    try:
        for epoch in bar:
            torch.manual_seed(_epoch_seed(seed, epoch))
            if not cfg.freeze_encoder and cfg.head_warmup_epochs:
                warm = epoch < cfg.head_warmup_epochs
                for p in net.encoder.parameters():
                    p.requires_grad_(not warm)
            net.train()
            tot, abs_err, count = 0.0, 0.0, 0
            for b_idx in _batches(records, train_idx, cfg.batch_sites, _epoch_seed(seed, epoch)):
                batch = collate(records, b_idx).to(device)
                target = y[b_idx].to(device)
                pred = net(batch)
                loss = loss_fn(pred, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _clip(list(net.parameters()), cfg.grad_clip)
                opt.step()
                tot += loss.item() * len(b_idx)
                abs_err += float((pred.detach() - target).abs().sum())
                count += len(b_idx)
            logs = {"train_loss": tot / count, "train_mae": abs_err / count * target_scale}
            if val_batches:
                pred = _predict_batches(net, records, val_batches, device)
                val_mae = (
                    float(np.abs(pred - y[np.concatenate(val_batches)].numpy()).mean())
                    * target_scale
                )
                logs["val_mae"] = logs["val_loss"] = val_mae
            monitor = logs.get("val_loss", logs["train_loss"])
            if monitor < best["value"]:
                best = {
                    "epoch": epoch,
                    "value": monitor,
                    "state": copy.deepcopy(
                        {k: v.detach().cpu() for k, v in net.state_dict().items()}
                    ),
                }
            history.append(logs)
            state.epoch = epoch
            bar.set_postfix(loss=f"{monitor:.4g}")
            call_hook(cbs, "on_epoch_end", "finetune", epoch, logs, state)
            if cfg.patience and epoch - best["epoch"] >= cfg.patience:
                break
    except StopTraining:
        logger.info("fine-tuning stopped by a callback at epoch %d", state.epoch)
    except BaseException as exc:
        call_hook(cbs, "on_exception", "finetune", state, exc)
        raise
    finally:
        if progress and len(history) < cfg.epochs:  # say why the bar stops short
            bar.set_description(f"fine-tuning stopped early (best epoch {best['epoch']})")
            bar.refresh()
        bar.close()
    if len(history) < cfg.epochs:
        logger.info(
            "fine-tuning stopped after %d of %d epochs; best validation epoch %d",
            len(history), cfg.epochs, best["epoch"],
        )  # fmt: skip
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    for p in net.encoder.parameters():
        p.requires_grad_(True)
    call_hook(cbs, "on_train_end", "finetune", state)
    net.cpu().eval()
    return history, int(best["epoch"])


def _predict_batches(
    net: SiteNetRegressorNet,
    records: Sequence[CrystalRecord],
    batches: list[np.ndarray],
    device: torch.device,
) -> np.ndarray:
    net.eval()
    out = []
    with torch.no_grad():
        for b_idx in batches:
            out.append(net(collate(records, b_idx).to(device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def predict(
    net: SiteNetRegressorNet,
    records: Sequence[CrystalRecord],
    batch_sites: int = 1200,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Predictions ``(n,)`` in the scaled target space, in the order of ``records``."""
    device = torch.device(device)
    net.to(device)
    idx = np.arange(len(records))
    batches = _batches(records, idx, batch_sites, None)
    pred = _predict_batches(net, records, batches, device)
    out = np.empty(len(records), dtype=np.float64)
    out[np.concatenate(batches)] = pred
    net.cpu()
    return out


def embed(
    encoder: SiteNetEncoder,
    records: Sequence[CrystalRecord],
    batch_sites: int = 1200,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Global vectors ``(n, global_dim)`` (means, no sampling), in the order of ``records``."""
    device = torch.device(device)
    encoder.to(device).eval()
    idx = np.arange(len(records))
    batches = _batches(records, idx, batch_sites, None)
    out = np.empty((len(records), encoder.cfg.global_dim), dtype=np.float64)
    with torch.no_grad():
        for b_idx in batches:
            out[b_idx] = encoder(collate(records, b_idx).to(device)).global_.cpu().numpy()
    encoder.cpu()
    return out
