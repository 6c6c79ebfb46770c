"""The Site-Net encoder: global self-attention over the sites of a real-space supercell.

Shapes used throughout (see :class:`matbench_dim.features.featurize.Batch`):

- ``B`` crystals in a batch, ``P`` unique (primitive-cell) sites per crystal (padded),
  ``S`` supercell sites per crystal (padded), ``F`` elemental site features.
- Attention rows are unique sites ``i``; columns are all supercell sites ``j``, each an image
  of the unique site ``image_of[j]`` whose features it shares.

The encoder has two stages, as in the Deep InfoMax configuration of the seed paper:

1. :class:`LocalEncoder` — site embedding, pair embedding of the minimum-image distance
   (optionally a Coulomb-like term), ``blocks`` multi-head attention blocks, and a linear
   bottleneck to a ``local_dim`` vector per unique site (mean and log-variance).
2. :class:`GlobalEncoder` — a DeepSets network: per-site MLP, masked mean over the crystal's
   sites, MLP to a ``global_dim`` crystal vector (mean and log-variance).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from matbench_dim.model import fused, kernels
from matbench_dim.model.geometry import coulomb_features
from matbench_dim.model.layout import PairInputs, pair_inputs, to_padded, to_rows

N_SITE_FEATURES = 8


class Mish(nn.Mish):
    """:class:`torch.nn.Mish` with the fused CPU kernels of :mod:`matbench_dim.model.fused`."""

    def forward(self, input: Tensor) -> Tensor:
        return fused.mish(input)


ACTIVATIONS: dict[str, type[nn.Module]] = {"mish": Mish, "silu": nn.SiLU}


@dataclass(frozen=True)
class EncoderConfig:
    """Hyperparameters of :class:`SiteNetEncoder` (defaults: the seed's DIM configuration).

    Attributes
    ----------
    site_features
        Number of elemental features per site (8 scaled Magpie-like properties).
    site_dim
        Width of the site embedding and of each attention block's output.
    pair_dim
        Width of the pair (interaction) embedding.
    heads
        Attention heads per block (``site_dim`` must be divisible by ``heads``).
    blocks
        Number of attention blocks (1 in the DIM work; 2 in supervised Site-Net).
    attention_hidden
        Hidden width of the attention-logit and value MLPs.
    local_dim
        Width of the local (per-site) bottleneck vector ``z``.
    global_hidden
        Per-site width inside the DeepSets global encoder before pooling.
    global_dim
        Width of the crystal (global) vector ``G``.
    distance_expansion
        0 feeds the raw distance (in Angstrom) to the pair embedding, as published; ``k > 0``
        expands it on ``k`` Gaussians between 0 and ``distance_cutoff`` first.
    distance_cutoff
        Upper end of the Gaussian expansion, in Angstrom (no cutoff is applied to attention).
    coulomb
        Add the clipped log Coulomb-like pair term ``log(Z_i Z_j / r_ij)`` (supervised
        Site-Net) to the distance.
    dropout
        Dropout on the attention values (0 in the seed).
    activation
        ``"mish"`` (the seed's) or ``"silu"``: on CPU, mish's backward pass is about 3x
        slower than silu's and dominates the step time (see ``benchmarks/``).
    """

    site_features: int = N_SITE_FEATURES
    site_dim: int = 64
    pair_dim: int = 64
    heads: int = 1
    blocks: int = 1
    attention_hidden: int = 64
    local_dim: int = 32
    global_hidden: int = 128
    global_dim: int = 64
    distance_expansion: int = 0
    distance_cutoff: float = 10.0
    coulomb: bool = False
    dropout: float = 0.0
    activation: str = "mish"

    def __post_init__(self) -> None:
        for f in fields(self):
            positive_int = f.type in ("int", int) and f.name != "distance_expansion"
            if positive_int and int(getattr(self, f.name)) < 1:
                raise ValueError(f"encoder {f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.site_dim % self.heads:
            raise ValueError(
                f"encoder site_dim ({self.site_dim}) must be divisible by heads ({self.heads})"
            )
        if self.distance_expansion < 0:
            raise ValueError("encoder distance_expansion must be >= 0")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"encoder activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"encoder dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the configuration."""
        return asdict(self)

    @property
    def pair_inputs(self) -> int:
        """Number of raw pair features fed to the pair embedding."""
        return max(1, self.distance_expansion) + int(self.coulomb)


def mlp(
    sizes: list[int],
    *,
    last_activation: bool = False,
    norm: bool = True,
    activation: str = "mish",
) -> nn.Sequential:
    """MLP with an activation and LayerNorm after each hidden layer (and the last if asked)."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2 or last_activation:
            layers.append(ACTIVATIONS[activation]())
            if norm:
                layers.append(nn.LayerNorm(b))
    return nn.Sequential(*layers)


class AttentionBlock(nn.Module):
    """One Site-Net attention block, in the row layout.

    Each unique site ``i`` attends over all supercell sites ``j``. The bond feature
    ``[h_i, h_image(j), e_ij]`` feeds two MLPs (``Linear -> act -> LayerNorm -> Linear``): one
    attention logit per head, and the values; padding columns get ``-inf`` logits. The
    computation is rearranged without changing the function:

    - the first (linear) layer of both MLPs is applied to the three parts separately
      (``W [a, b, c] = W_a a + W_b b + W_c c``), so the per-site parts are computed once per
      site; the pair part ``W_c e_ij`` (:meth:`project_pair`) depends on the geometry only, so
      passes over the same geometry with other species (DIM's engineered negatives) reuse it;
    - the LayerNorms' affine maps are folded into the next linear layers, so both halves are
      normalised by one call;
    - the attention weights sum to one over ``j``, so the values' last linear layer is
      applied after the weighted sum (``sum_j w_ij (V n_ij + b) = V sum_j w_ij n_ij + b``):
      once per site instead of once per pair. (With dropout on the values in training, the
      per-pair form is kept.)
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.site_dim // cfg.heads
        a = cfg.attention_hidden
        self.hidden = a
        self.w_site = nn.Linear(cfg.site_dim, 2 * a)
        self.w_neighbour = nn.Linear(cfg.site_dim, 2 * a, bias=False)
        self.w_pair = nn.Linear(cfg.pair_dim, 2 * a, bias=False)
        self.act = ACTIVATIONS[cfg.activation]()
        self.norm_logits = nn.LayerNorm(a)
        self.norm_values = nn.LayerNorm(a)
        self.logits = nn.Linear(a, cfg.heads)
        self.values = nn.Linear(a, cfg.site_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = mlp(
            [cfg.site_dim, cfg.site_dim], last_activation=True, activation=cfg.activation
        )

    def project_pair(self, pair: Tensor) -> Tensor:
        """The pair part ``W_c e_ij`` of the bond MLPs' first layer: ``(R, S, 2 hidden)``."""
        return self.w_pair(pair)

    def forward(
        self,
        h: Tensor,
        neighbour_index: Tensor,
        pair: Tensor | None,
        pair_mask: Tensor,
        projected_pair: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Update the unique sites.

        Parameters
        ----------
        h
            ``(R, D)`` embeddings of the unique sites (rows).
        neighbour_index
            ``(R, S)`` long: row shown in each column.
        pair
            ``(R, S, E)`` pair embeddings (may be None when ``projected_pair`` is given).
        pair_mask
            ``(R, S)`` bool, True for real pairs.
        projected_pair
            :meth:`project_pair` of ``pair``, when already computed.

        Returns
        -------
        tuple
            The new ``(R, D)`` site vectors and the ``(R, S, heads)`` attention weights.
        """
        r = neighbour_index.shape[0]
        if projected_pair is None:
            if pair is None:
                raise ValueError("AttentionBlock needs pair or projected_pair")
            projected_pair = self.project_pair(pair)
        eps = self.norm_logits.eps
        if eps != self.norm_values.eps or (self.training and self.dropout.p > 0):
            return self._per_pair_values(h, neighbour_index, projected_pair, pair_mask)
        # LayerNorm affine maps folded into the logits layer (and, below, the values layer)
        wl = self.logits.weight * self.norm_logits.weight
        bl = self.logits.bias + self.logits.weight @ self.norm_logits.bias
        args = (self.w_neighbour(h), self.w_site(h), projected_pair, neighbour_index, pair_mask)
        core = None
        act = activation_name(self.act)
        if act is not None and fused.use_fused(projected_pair):
            core = kernels.attention_core_blocks(*args, wl, bl, eps, act)
        if core is None:
            core = self._core_eager(*args, wl, bl, eps)
        weights, pooled = core  # (R, S, heads), (R, heads, hidden)
        # gamma and beta of the values' LayerNorm, then the values layer, once per site
        pooled = torch.addcmul(self.norm_values.bias, pooled, self.norm_values.weight)
        values = self.values(pooled)  # (R, heads, D)
        if self.heads == 1:
            x = values[:, 0, :]
        else:  # head k keeps its own slice of the values
            per_head = values.view(r, self.heads, self.heads, self.head_dim)
            x = per_head.diagonal(dim1=1, dim2=2).transpose(1, 2).reshape(r, -1)
        return self.out(x), weights

    def _core_eager(
        self,
        neighbour_part: Tensor,
        site_part: Tensor,
        pair_part: Tensor,
        neighbour_index: Tensor,
        pair_mask: Tensor,
        w_logits: Tensor,
        b_logits: Tensor,
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        """:func:`.kernels.attention_core` in eager mode, with fewer passes over memory.

        Gather then in-place adds; the logits and the pooling read the whole normalised
        tensor (zero weights on the other half), so that their gradients are dense tensors
        rather than zero-filled slices.
        """
        r, s = neighbour_index.shape
        a = self.hidden
        hidden = F.embedding(neighbour_index, neighbour_part)
        hidden = self.act(hidden.add_(pair_part).add_(site_part[:, None, :]))
        normed = F.layer_norm(hidden.view(r, s, 2, a), (a,), eps=eps).view(r, s, 2 * a)
        logits = F.linear(normed, F.pad(w_logits, (0, a)), b_logits)
        weights = torch.softmax(logits.masked_fill(~pair_mask[..., None], float("-inf")), dim=1)
        pooled = torch.bmm(weights.transpose(1, 2), normed)[..., a:]
        return weights, pooled

    def _per_pair_values(
        self, h: Tensor, neighbour_index: Tensor, projected_pair: Tensor, pair_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The literal form (values per pair): dropout on the values in training."""
        r, s = pair_mask.shape
        hidden = F.embedding(neighbour_index, self.w_neighbour(h))
        hidden = self.act(hidden.add_(projected_pair).add_(self.w_site(h)[:, None, :]))
        hl, hv = hidden.split(self.hidden, dim=-1)
        logits = self.logits(self.norm_logits(hl)).masked_fill(~pair_mask[..., None], float("-inf"))
        weights = torch.softmax(logits, dim=1)
        values = self.dropout(self.values(self.norm_values(hv))).reshape(
            r, s, self.heads, self.head_dim
        )
        x = (weights[..., None] * values).sum(dim=1).reshape(r, -1)
        return self.out(x), weights


def activation_name(module: nn.Module) -> str | None:
    """The :data:`ACTIVATIONS` name of an activation module (None for anything else)."""
    for name, cls in ACTIVATIONS.items():
        if type(module) is cls:
            return name
    return None


class LocalEncoder(nn.Module):
    """Unique-site features and pair geometry -> local vector mean and log-variance (rows).

    Site features are standardised with fixed per-feature statistics over the elements
    H-Lr (buffers, not learnt), so that the embeddings and DIM's critics see inputs of unit
    scale whatever the seed's fixed scalers leave.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mean, std = _site_feature_stats(cfg.site_features)
        self.register_buffer("feature_mean", mean, persistent=False)
        self.register_buffer("feature_std", std, persistent=False)
        act = cfg.activation
        self.site_embed = mlp(
            [cfg.site_features, cfg.site_dim], last_activation=True, activation=act
        )
        self.pair_embed = mlp([cfg.pair_inputs, cfg.pair_dim], last_activation=True, activation=act)
        self.blocks = nn.ModuleList(AttentionBlock(cfg) for _ in range(cfg.blocks))
        self.mu = nn.Linear(cfg.site_dim, cfg.local_dim)
        self.logvar = nn.Linear(cfg.site_dim, cfg.local_dim)
        if cfg.distance_expansion:
            centres = torch.linspace(0.0, cfg.distance_cutoff, cfg.distance_expansion)
            self.register_buffer("rbf_centres", centres, persistent=False)
            self.rbf_width = float(cfg.distance_cutoff / cfg.distance_expansion)

    def standardise(self, site_features: Tensor) -> Tensor:
        """Fixed standardisation of the scaled elemental features: ``(..., F)``."""
        return (site_features - self.feature_mean) / self.feature_std

    def pair_features(self, distances: Tensor, z_i: Tensor | None, z_j: Tensor | None) -> Tensor:
        """Raw pair features ``(R, S, pair_inputs)`` from distances in Angstrom.

        ``z_i``/``z_j`` are ``(R, S)`` atomic numbers of both ends (Coulomb term only).
        """
        if self.cfg.distance_expansion:
            diff = distances[..., None] - self.rbf_centres
            feats = torch.exp(-0.5 * (diff / self.rbf_width) ** 2)
        else:
            feats = distances[..., None]
        if self.cfg.coulomb:
            if z_i is None or z_j is None:
                raise ValueError("coulomb pair features need atomic numbers")
            feats = torch.cat([feats, coulomb_features(z_i, z_j, distances)[..., None]], dim=-1)
        return feats

    def embed_pairs(self, raw: Tensor) -> Tensor:
        """Pair embedding ``(R, S, pair_dim)`` of the raw pair features ``(R, S, pair_inputs)``.

        A one-feature input (the raw distance) goes through ``addcmul`` instead of a
        one-column matrix product (same numbers, one pass over memory).
        """
        first = self.pair_embed[0]
        if first.in_features != 1:
            return self.pair_embed(raw)
        act, norm = self.pair_embed[1], self.pair_embed[2]
        name = activation_name(act)
        if name is not None and fused.use_fused(raw, raw.numel() * first.out_features):
            args = (raw, first.weight[:, 0], first.bias, norm.weight, norm.bias, norm.eps, name)
            return kernels.PairEmbedding.apply(*args)
        x = torch.addcmul(first.bias, raw, first.weight[:, 0])
        for layer in self.pair_embed[1:]:
            x = layer(x)
        return x

    def pair_terms(
        self,
        distances: Tensor,
        neighbour_index: Tensor | None = None,
        atomic_numbers: Tensor | None = None,
    ) -> list[Tensor]:
        """Each block's projected pair embedding (:meth:`AttentionBlock.project_pair`).

        They depend on the geometry only (and, with the Coulomb term, on the species of both
        ends: ``neighbour_index`` and ``atomic_numbers`` are then needed), so passes that change
        the species but keep the distances can reuse them (see :meth:`encode`).
        """
        z_i = z_j = None
        if self.cfg.coulomb:
            if atomic_numbers is None or neighbour_index is None:
                raise ValueError("coulomb pair features need atomic numbers")
            z = atomic_numbers.to(distances.dtype)
            z_i = z[:, None].expand_as(distances)
            z_j = z[neighbour_index]
        e = self.embed_pairs(self.pair_features(distances, z_i, z_j))
        return [block.project_pair(e) for block in self.blocks]

    def encode(
        self,
        site_features: Tensor,
        neighbour_index: Tensor,
        distances: Tensor,
        pair_mask: Tensor,
        atomic_numbers: Tensor | None = None,
        pair_terms: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """:meth:`forward`, also returning the pair terms it used (see :meth:`pair_terms`).

        ``pair_terms`` given by the caller must come from the same distances (and, with the
        Coulomb term, the same species at both ends); they are used as they are.
        """
        h = self.site_embed(self.standardise(site_features))
        if pair_terms is None:
            pair_terms = self.pair_terms(distances, neighbour_index, atomic_numbers)
        for k, (block, projected) in enumerate(zip(self.blocks, pair_terms, strict=True)):
            update, _ = block(h, neighbour_index, None, pair_mask, projected)
            h = update if k == 0 else h + update
        return self.mu(h), self.logvar(h), pair_terms

    def forward(
        self,
        site_features: Tensor,
        neighbour_index: Tensor,
        distances: Tensor,
        pair_mask: Tensor,
        atomic_numbers: Tensor | None = None,
        pair_terms: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode every unique site (rows).

        Parameters
        ----------
        site_features
            ``(R, F)`` scaled elemental features of the unique sites.
        neighbour_index
            ``(R, S)`` long: the row each column is an image of. DIM's engineered negatives
            pass permuted or borrowed indices and features here.
        distances
            ``(R, S)`` minimum-image distances (Angstrom).
        pair_mask
            ``(R, S)`` bool.
        atomic_numbers
            ``(R,)`` long, needed only when the Coulomb pair term is on.
        pair_terms
            Precomputed :meth:`pair_terms` of the same geometry (optional).

        Returns
        -------
        tuple
            ``(mu, logvar)``, each ``(R, local_dim)``.
        """
        mu, logvar, _ = self.encode(
            site_features, neighbour_index, distances, pair_mask, atomic_numbers, pair_terms
        )
        return mu, logvar


def _site_feature_stats(n_features: int) -> tuple[Tensor, Tensor]:
    from matbench_dim.features.elements import element_feature_table

    table = torch.tensor(np.array(element_feature_table()[1:]), dtype=torch.float32)
    if table.shape[1] != n_features:
        return torch.zeros(n_features), torch.ones(n_features)
    return table.mean(0), table.std(0).clamp_min(1e-6)


class GlobalEncoder(nn.Module):
    """DeepSets: local vectors ``(B, P, local_dim)`` -> crystal vector mean and log-variance."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        act = cfg.activation
        self.pre = mlp(
            [cfg.local_dim, cfg.site_dim, cfg.global_hidden], last_activation=True, activation=act
        )
        self.post = mlp([cfg.global_hidden, cfg.global_dim], last_activation=True, activation=act)
        self.mu = nn.Linear(cfg.global_dim, cfg.global_dim)
        self.logvar = nn.Linear(cfg.global_dim, cfg.global_dim)

    def forward(self, local: Tensor, site_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pool the local vectors of each crystal (masked mean) -> ``(B, global_dim)`` x2."""
        m = site_mask[..., None].to(local.dtype)
        pooled = (self.pre(local) * m).sum(1) / m.sum(1).clamp_min(1.0)
        g = self.post(pooled)
        return self.mu(g), self.logvar(g)


class EncoderOutput(NamedTuple):
    """Everything the DIM objective and the heads need from one encoder pass."""

    local: Tensor
    """``(B, P, local_dim)`` local vectors (a reparametrised sample when sampling), 0 on
    padding; ``local[site_mask]`` gives them in the row order of :class:`PairInputs`. Only
    the local critic sees the sample; the global encoder pools ``local_mu``."""
    local_mu: Tensor
    """``(B, P, local_dim)`` local means (what the global encoder and critic see)."""
    local_logvar: Tensor
    global_: Tensor
    """``(B, global_dim)`` crystal vectors (a sample when sampling)."""
    global_mu: Tensor
    global_logvar: Tensor
    site_mask: Tensor
    """``(B, P)`` bool."""
    pairs: PairInputs
    pair_terms: list[Tensor] | None = None
    """Detached per-block pair terms of the local pass (:meth:`LocalEncoder.pair_terms`),
    for no-grad passes over the same geometry (DIM's engineered negatives)."""


def reparametrise(mu: Tensor, logvar: Tensor, generator: torch.Generator | None) -> Tensor:
    """Sample ``mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, 1)`` from ``generator``."""
    eps = torch.randn(mu.shape, generator=generator, device="cpu", dtype=mu.dtype).to(mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


class SiteNetEncoder(nn.Module):
    """Site-Net encoder: local (per-site) vectors and a global (per-crystal) vector.

    The global encoder pools the local *means* whether or not the local stage samples (as
    in the seed's code: the reparametrised local sample exists only for the local critic).
    With ``detach_local=True`` (DIM pretraining) it sees detached means, so the global stage
    never trains the local encoder; fine-tuning uses ``detach_local=False`` so the whole
    network learns. See ``docs/dim-stage-inputs.md``.
    """

    def __init__(self, cfg: EncoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or EncoderConfig()
        self.local = LocalEncoder(self.cfg)
        self.global_ = GlobalEncoder(self.cfg)

    def forward(
        self,
        batch: Any,
        *,
        sample: bool = False,
        detach_local: bool = False,
        generator: torch.Generator | None = None,
        pairs: PairInputs | None = None,
    ) -> EncoderOutput:
        """Encode a :class:`~matbench_dim.features.featurize.Batch`.

        Parameters
        ----------
        batch
            Padded batch of crystals.
        sample
            Draw reparametrised samples (pretraining): ``local`` is the local sample (for the
            local critic) and ``global_`` the global one; ``G`` is computed from the local
            means either way.
        detach_local
            Stop gradients between the local and global stages.
        generator
            Random generator for the samples.
        pairs
            Precomputed :func:`pair_inputs` of the batch.
        """
        pairs = pairs if pairs is not None else pair_inputs(batch)
        site_mask = batch.prim_mask
        mu_rows, logvar_rows, pair_terms = self.local.encode(
            to_rows(batch.site_features, site_mask),
            pairs.neighbour_index,
            pairs.distances,
            pairs.pair_mask,
            to_rows(batch.atomic_numbers, site_mask),
        )
        mu = to_padded(mu_rows, site_mask)
        logvar = to_padded(logvar_rows, site_mask)
        z = reparametrise(mu, logvar, generator) * site_mask[..., None] if sample else mu
        # the global encoder always pools the local *means* (the seed's wiring): the sample z
        # is only for the local critic, so G never learns from, or on, the local noise
        g_mu, g_logvar = self.global_(mu.detach() if detach_local else mu, site_mask)
        g = reparametrise(g_mu, g_logvar, generator) if sample else g_mu
        pair_terms = [t.detach() for t in pair_terms] if pair_terms is not None else None
        return EncoderOutput(z, mu, logvar, g, g_mu, g_logvar, site_mask, pairs, pair_terms)


class SiteNetRegressorNet(nn.Module):
    """Encoder + regression head ``Linear(G, hidden) -> mish -> Linear(hidden, 1)``.

    ``forward(batch)`` returns ``(B,)`` predictions in the scaled target space.
    """

    def __init__(self, encoder: SiteNetEncoder, head_hidden: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        g = encoder.cfg.global_dim
        act = ACTIVATIONS[encoder.cfg.activation]
        self.head = nn.Sequential(nn.Linear(g, head_hidden), act(), nn.Linear(head_hidden, 1))

    def forward(self, batch: Any) -> Tensor:
        """Predict one scalar per crystal (deterministic: means, no sampling)."""
        out = self.encoder(batch)
        return self.head(out.global_).squeeze(-1)


def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` is True (0 where nothing is valid)."""
    m = mask.to(x.dtype)
    while m.dim() < x.dim():
        m = m[..., None]
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "AttentionBlock",
    "EncoderConfig",
    "EncoderOutput",
    "GlobalEncoder",
    "LocalEncoder",
    "SiteNetEncoder",
    "SiteNetRegressorNet",
    "count_parameters",
    "masked_mean",
    "reparametrise",
]


def projection(n_in: int, hidden: int, n_out: int, activation: str = "mish") -> nn.Sequential:
    """Critic projection ``Linear -> act -> Linear`` (no normalisation, as in the seed)."""
    return nn.Sequential(
        nn.Linear(n_in, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, n_out)
    )
