"""The scikit-learn regressor: DIM pretraining + Site-Net fine-tuning.

The parameter routing here (:class:`DIMParamsMixin`) is shared with the frozen embedder
(:mod:`matbench_dim.embedder`); the saved encoder is :mod:`matbench_dim.pretrained`.

Every hyperparameter is an ``__init__`` keyword stored verbatim. Nested knobs use the
``group__name`` convention (``encoder__heads``, ``dim__weight_kl``, ``optimizer__lr``,
``pretrain__epochs``, ``finetune__lr``, ``featurizer__max_supercell_sites``) so that
``set_params``, ``clone``, ``GridSearchCV`` and Optuna reach each one directly. Torch objects
are built in ``fit`` from these parameters; fitted attributes end in ``_``.

Saving writes a folder with ``config.json`` (parameters, fitted scalars, a format version)
and ``weights.pt`` (a torch ``state_dict``, loaded with ``weights_only=True``): no pickle.
"""

from __future__ import annotations

import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from matbench_dim.features.featurize import CrystalRecord, FeaturizerConfig, featurize
from matbench_dim.features.inputs import as_structures, as_targets, ids_of
from matbench_dim.model.dim import DIMConfig
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder, SiteNetRegressorNet
from matbench_dim.pretrained import PretrainedEncoder, read_meta, write_folder
from matbench_dim.runtime import (
    configure_allocator,
    configure_threads,
    resolve_device,
    seed_everything,
)
from matbench_dim.training.callbacks import Callback, EarlyStopping
from matbench_dim.training.common import OptimizerConfig
from matbench_dim.training.finetune import FinetuneConfig, embed, finetune, predict
from matbench_dim.training.precision import PRECISIONS
from matbench_dim.training.pretrain import PretrainConfig, PretrainResult, pretrain_dim
from matbench_dim.versions import library_versions

logger = logging.getLogger(__name__)

GROUPS: dict[str, type] = {
    "featurizer": FeaturizerConfig,
    "encoder": EncoderConfig,
    "dim": DIMConfig,
    "optimizer": OptimizerConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
}
"""Parameter groups: ``<group>__<field>`` keywords map onto these config dataclasses."""


class DIMParamsMixin:
    """Shared machinery: group configs from flat params, featurization, encoder reuse."""

    def _group(self, group: str) -> Any:
        cls = GROUPS[group]
        kwargs = {
            f.name: getattr(self, f"{group}__{f.name}")
            for f in fields(cls)
            if hasattr(self, f"{group}__{f.name}")
        }
        if group == "featurizer":
            kwargs["coulomb"] = self.encoder__coulomb
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a featurizer config without a field we pass
            raise ValueError(f"invalid {group} parameters: {exc}") from exc

    def set_params(self, **params: Any) -> Any:
        """Set parameters by their full names (``encoder__heads=3``); returns ``self``."""
        valid = self.get_params(deep=False)
        for key, value in params.items():
            if key not in valid:
                raise ValueError(
                    f"Invalid parameter {key!r} for {type(self).__name__}; "
                    f"valid parameters are: {sorted(valid)}"
                )
            setattr(self, key, value)
        return self

    def _featurize(self, X: list[Any], ids: list[str]) -> list[CrystalRecord]:
        return featurize(
            X,
            self._group("featurizer"),
            ids=ids,
            cache_dir=self.cache_dir,
            n_jobs=self.n_jobs,
            progress=bool(self.verbose),
        )

    def _setup(self) -> torch.device:
        configure_threads(None)
        configure_allocator()
        seed_everything(int(self.random_state))
        return resolve_device(self.device)

    def _callbacks(self) -> list[Callback]:
        cbs = self.callbacks
        if cbs is None:
            return []
        if isinstance(cbs, Callback):
            return [cbs]
        return list(cbs)

    def _run_pretraining(
        self, records: list[CrystalRecord], device: torch.device, probe_targets: np.ndarray | None
    ) -> PretrainResult:
        result = pretrain_dim(
            records,
            encoder_cfg=self._group("encoder"),
            dim_cfg=self._group("dim"),
            optimizer_cfg=self._group("optimizer"),
            cfg=self._group("pretrain"),
            seed=int(self.random_state),
            device=device,
            callbacks=self._callbacks(),
            probe_targets=probe_targets,
            checkpoint_path=self.pretrain__checkpoint,
            progress=bool(self.verbose),
            precision=self.precision,
        )
        logger.info(
            "DIM pretraining: %d crystals (%d validation), best epoch %d of %d, %.1f s",
            result.n_train,
            result.n_val,
            result.best_epoch,
            len(result.history),
            result.wall_s,
        )
        return result

    def _initial_encoder(self) -> tuple[SiteNetEncoder, bool]:
        """A fresh encoder, or the one in ``encoder_init`` (path or PretrainedEncoder)."""
        cfg = self._group("encoder")
        if self.encoder_init is None:
            torch.manual_seed(int(self.random_state))
            return SiteNetEncoder(cfg), False
        enc = self.encoder_init
        if not isinstance(enc, PretrainedEncoder):
            enc = PretrainedEncoder.load(enc)
        if enc.config != cfg:
            raise ValueError(
                "encoder_init was pretrained with a different encoder configuration: "
                f"{enc.config} vs this estimator's {cfg}"
            )
        return enc.build(), True


class SiteNetDIMRegressor(DIMParamsMixin, RegressorMixin, BaseEstimator):
    """Site-Net regressor, Deep InfoMax-pretrained on structures, then fine-tuned on labels.

    ``fit(X, y)`` first pretrains the encoder with DIM on the structures of ``X`` (their
    labels are not used by pretraining; matbench's own fold loop therefore pretrains on each
    training fold), plus ``X_unlabeled`` when given, then fine-tunes encoder + head on
    ``(X, y)``. ``encoder_init`` reuses an encoder pretrained once (by :meth:`pretrain` /
    :meth:`save_encoder`) for many fine-tunes, without pretraining again.
    ``random_init=True`` starts from random weights instead (the random-init baseline).

    Parameters
    ----------
    mode
        ``"transfer"``: fine-tune the whole network; ``"representation"``: freeze the
        encoder and train only the head.
    encoder_init
        ``None``, a folder written by :meth:`save_encoder`, or a :class:`PretrainedEncoder`.
    random_init
        Skip DIM pretraining and fine-tune from random weights (excludes ``encoder_init`` and
        ``X_unlabeled``).
    random_state
        Seed of weights, splits, batch order and DIM samples (same seed -> same predictions
        on CPU).
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    precision
        Training arithmetic: ``"auto"`` (bf16 autocast on CUDA where supported, else fp16 with
        a gradient scaler; float32 on CPU), ``"fp32"``, ``"bf16"`` or ``"fp16"``
        (:mod:`matbench_dim.training.precision`).
    callbacks
        :class:`~matbench_dim.training.callbacks.Callback` objects (tracking, pruning, checkpoints).
    cache_dir
        Folder of the featurization cache (``None``: no cache).
    n_jobs
        Featurization processes.
    verbose
        0: quiet; 1: progress bars.
    featurizer__*, encoder__*, dim__*, optimizer__*, pretrain__*, finetune__*
        Fields of :class:`~matbench_dim.features.featurize.FeaturizerConfig`,
        :class:`~matbench_dim.model.sitenet.EncoderConfig`,
        :class:`~matbench_dim.model.dim.DIMConfig`,
        :class:`~matbench_dim.training.common.OptimizerConfig`,
        :class:`~matbench_dim.training.pretrain.PretrainConfig` and
        :class:`~matbench_dim.training.finetune.FinetuneConfig` (their docstrings give meaning and
        units). ``pretrain__checkpoint`` is a file to checkpoint/resume pretraining.

    Attributes
    ----------
    model_
        The fitted :class:`SiteNetRegressorNet`.
    pretrained_
        True when the encoder started from DIM weights.
    history_
        ``{"pretrain": [...], "finetune": [...]}``: per-epoch logs.
    target_mean_, target_std_
        Target standardisation.
    """

    def __init__(
        self,
        *,
        mode: str = "transfer",
        encoder_init: Any = None,
        random_init: bool = False,
        random_state: int = 0,
        device: str = "auto",
        precision: str = "auto",
        callbacks: Any = None,
        cache_dir: str | None = None,
        n_jobs: int = 1,
        verbose: int = 0,
        featurizer__max_supercell_sites: int = 50,
        featurizer__primitive: bool = True,
        encoder__site_dim: int = 64,
        encoder__pair_dim: int = 64,
        encoder__heads: int = 1,
        encoder__blocks: int = 1,
        encoder__attention_hidden: int = 64,
        encoder__local_dim: int = 32,
        encoder__global_hidden: int = 128,
        encoder__global_dim: int = 64,
        encoder__distance_expansion: int = 0,
        encoder__distance_cutoff: float = 10.0,
        encoder__coulomb: bool = False,
        encoder__dropout: float = 0.0,
        encoder__activation: str = "mish",
        dim__estimator: str = "jsd",
        dim__weight_local: float = 1.0,
        dim__weight_global: float = 1.0,
        dim__weight_kl: float = 0.1,
        dim__weight_prior: float = 0.0,
        dim__extra_false_samples: bool = True,
        dim__critic_dim: int = 128,
        dim__critic_hidden: int = 64,
        optimizer__lr: float = 1e-4,
        optimizer__weight_decay: float = 1e-4,
        optimizer__eps: float = 1e-7,
        optimizer__amsgrad: bool = True,
        pretrain__epochs: int = 30,
        pretrain__batch_sites: int = 1200,
        pretrain__val_fraction: float = 0.05,
        pretrain__patience: int = 10,
        pretrain__grad_clip: float = 10.0,
        pretrain__stop: str = "dim_loss",
        pretrain__checkpoint: str | None = None,
        finetune__epochs: int = 300,
        finetune__batch_sites: int = 400,
        finetune__val_fraction: float = 0.2,
        finetune__patience: int = 100,
        finetune__lr: float | None = 3e-4,
        finetune__loss: str = "mse",
        finetune__head_hidden: int = 64,
        finetune__grad_clip: float = 10.0,
        finetune__encoder_lr_scale: float = 1.0,
        finetune__head_warmup_epochs: int = 0,
        finetune__min_steps: int = 0,
        finetune__patience_unit: str = "epochs",
    ) -> None:
        self.mode = mode
        self.encoder_init = encoder_init
        self.random_init = random_init
        self.random_state = random_state
        self.device = device
        self.precision = precision
        self.callbacks = callbacks
        self.cache_dir = cache_dir
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.featurizer__max_supercell_sites = featurizer__max_supercell_sites
        self.featurizer__primitive = featurizer__primitive
        self.encoder__site_dim = encoder__site_dim
        self.encoder__pair_dim = encoder__pair_dim
        self.encoder__heads = encoder__heads
        self.encoder__blocks = encoder__blocks
        self.encoder__attention_hidden = encoder__attention_hidden
        self.encoder__local_dim = encoder__local_dim
        self.encoder__global_hidden = encoder__global_hidden
        self.encoder__global_dim = encoder__global_dim
        self.encoder__distance_expansion = encoder__distance_expansion
        self.encoder__distance_cutoff = encoder__distance_cutoff
        self.encoder__coulomb = encoder__coulomb
        self.encoder__dropout = encoder__dropout
        self.encoder__activation = encoder__activation
        self.dim__estimator = dim__estimator
        self.dim__weight_local = dim__weight_local
        self.dim__weight_global = dim__weight_global
        self.dim__weight_kl = dim__weight_kl
        self.dim__weight_prior = dim__weight_prior
        self.dim__extra_false_samples = dim__extra_false_samples
        self.dim__critic_dim = dim__critic_dim
        self.dim__critic_hidden = dim__critic_hidden
        self.optimizer__lr = optimizer__lr
        self.optimizer__weight_decay = optimizer__weight_decay
        self.optimizer__eps = optimizer__eps
        self.optimizer__amsgrad = optimizer__amsgrad
        self.pretrain__epochs = pretrain__epochs
        self.pretrain__batch_sites = pretrain__batch_sites
        self.pretrain__val_fraction = pretrain__val_fraction
        self.pretrain__patience = pretrain__patience
        self.pretrain__grad_clip = pretrain__grad_clip
        self.pretrain__stop = pretrain__stop
        self.pretrain__checkpoint = pretrain__checkpoint
        self.finetune__epochs = finetune__epochs
        self.finetune__batch_sites = finetune__batch_sites
        self.finetune__val_fraction = finetune__val_fraction
        self.finetune__patience = finetune__patience
        self.finetune__lr = finetune__lr
        self.finetune__loss = finetune__loss
        self.finetune__head_hidden = finetune__head_hidden
        self.finetune__grad_clip = finetune__grad_clip
        self.finetune__encoder_lr_scale = finetune__encoder_lr_scale
        self.finetune__head_warmup_epochs = finetune__head_warmup_epochs
        self.finetune__min_steps = finetune__min_steps
        self.finetune__patience_unit = finetune__patience_unit

    # ------------------------------------------------------------------ configs
    def _finetune_cfg(self) -> FinetuneConfig:
        if self.mode not in ("transfer", "representation"):
            raise ValueError(f"mode must be 'transfer' or 'representation', got {self.mode!r}")
        cfg = self._group("finetune")
        if self.mode == "representation":
            cfg = FinetuneConfig(**{**cfg.__dict__, "freeze_encoder": True})
        return cfg

    def validate_params(self) -> None:
        """Check every parameter now (``fit`` does it too); raises ``ValueError`` naming it."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for group in GROUPS:
            self._group(group)  # raises a ValueError naming the bad parameter
        self._finetune_cfg()

    # ------------------------------------------------------------------ API
    def pretrain(self, X: Any, y_probe: Any = None) -> SiteNetDIMRegressor:
        """DIM-pretrain the encoder on structures ``X`` (no labels); returns ``self``.

        ``y_probe`` (optional, NaN allowed) only feeds the detached property probe that is
        logged during pretraining; it never influences the encoder or model selection.
        """
        self.validate_params()
        structures = as_structures(X)
        device = self._setup()
        records = self._featurize(structures, ids_of(X, len(structures)))
        probe = None if y_probe is None else np.asarray(y_probe, dtype=float)
        result = self._run_pretraining(records, device, probe)
        self.pretrained_encoder_ = PretrainedEncoder.from_module(
            result.encoder,
            {"n_pretrain": len(records), "best_epoch": result.best_epoch, "wall_s": result.wall_s},
        )
        self.pretrain_history_ = result.history
        return self

    def save_encoder(self, path: str | os.PathLike[str]) -> Path:
        """Save the DIM-pretrained encoder (after :meth:`pretrain` or a pretraining fit)."""
        if not hasattr(self, "pretrained_encoder_"):
            raise NotFittedError(
                "no pretrained encoder: call pretrain() or fit(..., X_unlabeled=...)"
            )
        return self.pretrained_encoder_.save(path)

    def fit(self, X: Any, y: Any, X_unlabeled: Any = None) -> SiteNetDIMRegressor:
        """DIM-pretrain on the structures of ``X`` (and ``X_unlabeled``), then fine-tune on
        ``(X, y)``; with ``encoder_init`` fine-tune that encoder, with ``random_init`` random
        weights.

        Parameters
        ----------
        X
            Sequence (or pandas Series) of pymatgen Structures with labels.
        y
            ``(n,)`` finite targets (used by fine-tuning, never by DIM pretraining).
        X_unlabeled
            More structures for the pretraining pool, labels hidden (e.g. the rest of a
            matbench training fold); DIM pretrains on ``X`` and these together (duplicates
            removed).
        """
        self.validate_params()
        if self.random_init and (self.encoder_init is not None or X_unlabeled is not None):
            raise ValueError("random_init=True excludes encoder_init and X_unlabeled")
        if self.encoder_init is not None and X_unlabeled is not None:
            raise ValueError("give either encoder_init or X_unlabeled, not both")
        structures = as_structures(X)
        targets = as_targets(y, len(structures))
        device = self._setup()
        records = self._featurize(structures, ids_of(X, len(structures)))
        history: dict[str, list[dict[str, float]]] = {"pretrain": [], "finetune": []}
        encoder: SiteNetEncoder | None = None
        if self.encoder_init is None and not self.random_init:
            extra_records: list[CrystalRecord] = []
            if X_unlabeled is not None:
                extra = as_structures(X_unlabeled, "X_unlabeled")
                extra_records = self._featurize(extra, ids_of(X_unlabeled, len(extra)))
            pool, probe = _union(records, targets, extra_records)
            result = self._run_pretraining(pool, device, probe)
            self.pretrained_encoder_ = PretrainedEncoder.from_module(
                result.encoder, {"n_pretrain": len(pool), "best_epoch": result.best_epoch}
            )
            history["pretrain"] = result.history
            encoder, pretrained = result.encoder, True
        else:
            encoder, pretrained = self._initial_encoder()
        cfg = self._finetune_cfg()
        self.target_mean_ = float(targets.mean())
        self.target_std_ = float(targets.std()) or 1.0
        torch.manual_seed(int(self.random_state) + 1)
        net = SiteNetRegressorNet(encoder, cfg.head_hidden)
        callbacks = self._callbacks()
        if cfg.patience:
            callbacks.append(
                EarlyStopping(
                    "val_loss",
                    patience=cfg.patience,
                    stage="finetune",
                    min_steps=cfg.min_steps,
                    unit=cfg.patience_unit,
                )
            )
        ft_history, best_epoch = finetune(
            net,
            records,
            (targets - self.target_mean_) / self.target_std_,
            cfg=cfg,
            optimizer_cfg=self._group("optimizer"),
            target_scale=self.target_std_,
            seed=int(self.random_state),
            device=device,
            callbacks=callbacks,
            progress=bool(self.verbose),
            precision=self.precision,
        )
        history["finetune"] = ft_history
        self.model_ = net
        self.pretrained_ = pretrained
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.n_train_ = len(records)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets ``(n,)`` (float64, target units) for structures ``X``."""
        check_is_fitted(self, "model_")
        structures = as_structures(X)
        device = self._setup()
        return self._predict_records(
            self._featurize(structures, ids_of(X, len(structures))), device
        )

    def _predict_records(self, records: list[CrystalRecord], device: torch.device) -> np.ndarray:
        """Predictions ``(n,)`` for already featurized crystals (an ensemble shares them)."""
        scaled = predict(self.model_, records, self.pretrain__batch_sites, device)
        return scaled * self.target_std_ + self.target_mean_

    def transform(self, X: Any) -> np.ndarray:
        """Global vectors ``(n, global_dim)`` of the fitted encoder (no sampling)."""
        check_is_fitted(self, "model_")
        structures = as_structures(X)
        device = self._setup()
        records = self._featurize(structures, ids_of(X, len(structures)))
        return embed(self.model_.encoder, records, self.pretrain__batch_sites, device)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the fitted estimator to a folder (``config.json`` + ``weights.pt``)."""
        check_is_fitted(self, "model_")
        params = {
            k: v
            for k, v in self.get_params(deep=False).items()
            if k not in ("callbacks", "encoder_init")
        }
        meta = {
            "params": params,
            "fitted": {
                "target_mean": self.target_mean_,
                "target_std": self.target_std_,
                "pretrained": self.pretrained_,
                "best_epoch": self.best_epoch_,
                "n_train": self.n_train_,
            },
            "history": self.history_,
            "versions": library_versions(),
        }
        return write_folder(
            path, "matbench_dim.SiteNetDIMRegressor", self.model_.state_dict(), "weights.pt", meta
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SiteNetDIMRegressor:
        """Load a folder written by :meth:`save`."""
        path = Path(path)
        meta = read_meta(path, "matbench_dim.SiteNetDIMRegressor")
        est = cls(**meta["params"])
        cfg = est._group("encoder")
        net = SiteNetRegressorNet(SiteNetEncoder(cfg), est._finetune_cfg().head_hidden)
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.eval()
        fitted = meta["fitted"]
        est.model_ = net
        est.target_mean_ = float(fitted["target_mean"])
        est.target_std_ = float(fitted["target_std"])
        est.pretrained_ = bool(fitted["pretrained"])
        est.best_epoch_ = int(fitted["best_epoch"])
        est.n_train_ = int(fitted["n_train"])
        est.history_ = meta.get("history", {})
        return est


def _union(
    records: list[CrystalRecord], targets: np.ndarray, extra: list[CrystalRecord]
) -> tuple[list[CrystalRecord], np.ndarray]:
    """Labelled + unlabelled records without duplicates; probe labels NaN where unknown."""
    from matbench_dim.training.common import records_fingerprint

    seen: dict[str, int] = {}
    pool: list[CrystalRecord] = []
    probe: list[float] = []
    for rec, t in [*zip(records, targets, strict=True), *((r, np.nan) for r in extra)]:
        key = records_fingerprint([rec])
        if key in seen:
            continue
        seen[key] = len(pool)
        pool.append(rec)
        probe.append(float(t))
    return pool, np.asarray(probe)
