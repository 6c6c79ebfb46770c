"""The frozen DIM representation as a scikit-learn transformer (the *representation* use)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from matbench_dim.estimator import DIMParamsMixin
from matbench_dim.features.inputs import as_structures, ids_of
from matbench_dim.training.finetune import embed


class DIMEmbedder(DIMParamsMixin, TransformerMixin, BaseEstimator):
    """Frozen DIM representation: structures -> global vectors ``(n, global_dim)``.

    ``fit(X)`` DIM-pretrains on ``X`` (labels, if passed, are ignored) unless ``encoder_init``
    gives a pretrained encoder, in which case ``fit`` only loads it; ``random_init=True``
    gives the randomly initialised encoder (the representation baseline).
    Works inside a scikit-learn ``Pipeline``: ``Pipeline([("dim", DIMEmbedder(...)),
    ("rf", RandomForestRegressor())])``.
    """

    def __init__(
        self,
        *,
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
    ) -> None:
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

    def fit(self, X: Any, y: Any = None) -> DIMEmbedder:
        """Pretrain (or load, or randomly initialise) the encoder; ``y`` is ignored."""
        for group in ("featurizer", "encoder", "dim", "optimizer", "pretrain"):
            self._group(group)
        if self.random_init and self.encoder_init is not None:
            raise ValueError("random_init=True and encoder_init are exclusive")
        if self.random_init or self.encoder_init is not None:
            self._setup()
            self.encoder_, self.pretrained_ = self._initial_encoder()
            self.history_ = []
            return self
        structures = as_structures(X)
        device = self._setup()
        records = self._featurize(structures, ids_of(X, len(structures)))
        result = self._run_pretraining(records, device, None)
        self.encoder_, self.pretrained_ = result.encoder, True
        self.history_ = result.history
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Global vectors ``(n, global_dim)`` (float64) of structures ``X``."""
        check_is_fitted(self, "encoder_")
        structures = as_structures(X)
        device = self._setup()
        records = self._featurize(structures, ids_of(X, len(structures)))
        return embed(self.encoder_, records, self.pretrain__batch_sites, device)

    def get_feature_names_out(self, input_features: Sequence[str] | None = None) -> np.ndarray:
        """Names ``dim_0 ... dim_{global_dim - 1}``."""
        return np.asarray([f"dim_{i}" for i in range(self.encoder__global_dim)], dtype=object)
