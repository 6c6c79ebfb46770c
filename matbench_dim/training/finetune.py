"""Supervised fine-tuning of encoder + head, prediction and frozen embeddings.

Early stopping, tracking and pruning reach the loop as callbacks
(:mod:`matbench_dim.training.callbacks`); batches are seeded by ``(seed, epoch)``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from matbench_dim.features.featurize import CrystalRecord, collate
from matbench_dim.model.sitenet import SiteNetEncoder, SiteNetRegressorNet
from matbench_dim.training.callbacks import Callback, StopTraining, TrainingState, call_hook
from matbench_dim.training.common import (
    OptimizerConfig,
    check_loop,
    clip_grad,
    epoch_seed,
    make_batches,
    split_train_val,
)
from matbench_dim.training.precision import mixed_precision, to_device

logger = logging.getLogger(__name__)


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
        Epochs (or optimizer steps, see ``patience_unit``) without improvement of the
        validation MAE before stopping (0: never).
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
    min_steps
        Optimizer steps the fine-tuning runs at least: the epoch budget is raised to
        ``ceil(min_steps / steps per epoch)`` when ``epochs`` would give fewer, and early
        stopping waits for them (0: the budget is ``epochs``). A budget in steps is the same
        amount of training at every n (at n = 100 an epoch is one or two steps).
    patience_unit
        ``"epochs"`` (default) or ``"steps"``: what ``patience`` counts. In steps, the
        patience is the same amount of training at every n, like ``min_steps``; it is checked
        at the end of each epoch.
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
    min_steps: int = 0
    patience_unit: str = "epochs"

    def __post_init__(self) -> None:
        check_loop(self, "finetune")
        if self.patience_unit not in ("epochs", "steps"):
            raise ValueError(
                f"finetune patience_unit must be 'epochs' or 'steps', got {self.patience_unit!r}"
            )
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int):
            raise ValueError(f"finetune min_steps must be an int, got {self.min_steps!r}")
        if self.min_steps < 0:
            raise ValueError(f"finetune min_steps must be >= 0, got {self.min_steps}")
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
    precision: str = "fp32",
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
    seed, device, callbacks, progress, precision
        As in :func:`~matbench_dim.training.pretrain.pretrain_dim`.

    Returns
    -------
    tuple
        ``(history, best_epoch)``. Logs hold ``train_loss`` (scaled), ``train_mae`` and
        ``val_mae`` (target units) and ``val_loss`` (= ``val_mae``, what pruning and early
        stopping watch).
    """
    device = torch.device(device)
    amp = mixed_precision(device, precision)
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
    best = {"epoch": -1, "steps": 0, "value": math.inf, "state": None}
    val_batches = make_batches(records, val_idx, cfg.batch_sites, None) if len(val_idx) else []
    budget = cfg.epochs  # raised after the first epoch when min_steps asks for more
    steps = 0
    bar = tqdm(total=budget, desc="fine-tuning", unit="epoch", disable=not progress)
    try:
        epoch = -1
        while epoch + 1 < budget:
            epoch += 1
            torch.manual_seed(epoch_seed(seed, epoch))
            if not cfg.freeze_encoder and cfg.head_warmup_epochs:
                warm = epoch < cfg.head_warmup_epochs
                for p in net.encoder.parameters():
                    p.requires_grad_(not warm)
            net.train()
            tot, abs_err, count = 0.0, 0.0, 0
            for b_idx in make_batches(records, train_idx, cfg.batch_sites, epoch_seed(seed, epoch)):
                batch = to_device(collate(records, b_idx), device)
                target = y[b_idx].to(device)
                with amp.autocast():
                    pred = net(batch)
                    loss = loss_fn(pred.float(), target)
                opt.zero_grad(set_to_none=True)
                amp.backward(loss)
                amp.unscale([opt])
                clip_grad(list(net.parameters()), cfg.grad_clip)
                amp.step([opt])
                steps += 1
                tot += loss.item() * len(b_idx)
                abs_err += float((pred.detach() - target).abs().sum())
                count += len(b_idx)
            if epoch == 0 and cfg.min_steps > steps * budget:
                budget = math.ceil(cfg.min_steps / steps)
                bar.total = budget
                logger.info(
                    "fine-tuning: %d steps per epoch; %d epochs for min_steps=%d",
                    steps, budget, cfg.min_steps,
                )  # fmt: skip
            logs = {"train_loss": tot / count, "train_mae": abs_err / count * target_scale,
                    "steps": float(steps)}  # fmt: skip
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
                    "steps": steps,
                    "value": monitor,
                    "state": copy.deepcopy(
                        {k: v.detach().cpu() for k, v in net.state_dict().items()}
                    ),
                }
            history.append(logs)
            state.epoch = epoch
            bar.set_postfix(loss=f"{monitor:.4g}")
            call_hook(cbs, "on_epoch_end", "finetune", epoch, logs, state)
            bar.update(1)
            waited = (
                epoch - best["epoch"] if cfg.patience_unit == "epochs" else steps - best["steps"]
            )
            if cfg.patience and waited >= cfg.patience and steps >= cfg.min_steps:
                break
    except StopTraining:
        logger.info("fine-tuning stopped by a callback at epoch %d", state.epoch)
    except BaseException as exc:
        call_hook(cbs, "on_exception", "finetune", state, exc)
        raise
    finally:
        if progress and len(history) < budget:  # say why the bar stops short
            bar.set_description(f"fine-tuning stopped early (best epoch {best['epoch']})")
            bar.refresh()
        bar.close()
    if len(history) < budget:
        logger.info(
            "fine-tuning stopped after %d of %d epochs (%d steps); best validation epoch %d",
            len(history), budget, steps, best["epoch"],
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
    batches = make_batches(records, idx, batch_sites, None)
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
    batches = make_batches(records, idx, batch_sites, None)
    out = np.empty((len(records), encoder.cfg.global_dim), dtype=np.float64)
    with torch.no_grad():
        for b_idx in batches:
            out[b_idx] = encoder(collate(records, b_idx).to(device)).global_.cpu().numpy()
    encoder.cpu()
    return out
