"""Deep InfoMax on Site-Net: critics, losses and the engineered false samples.

The objective follows the seed paper's published configuration (see ``docs/method.md`` in
the shared docs): two stages trained together, each with its own optimiser.

- **Local stage** (:class:`LocalDIMLoss`): a dot-product critic scores a site's local vector
  ``z_i`` against each of its supercell pairs ``u_ij = [s_image(j), d_ij]`` (raw neighbour
  features and distance), weighted by ``(d_ij + 1)^-2`` normalised over ``j``. Negatives
  borrow the pair row of a site of another crystal (the batch rolled by half its crystals):
  the whole row, own species with borrowed distances, borrowed species with own distances.
- **Global stage** (:class:`GlobalDIMLoss`) on the detached local *means* (never the
  reparametrised samples, which only the local critic sees): a critic scores the crystal
  vector ``G`` against each of the crystal's ``z_i``. Negatives are the other
  crystals' ``G`` and, with ``extra_false_samples``, three engineered false local vectors
  paired with the crystal's own ``G`` (:func:`engineered_false_locals`).
- A Gaussian KL penalty on each stage's reparametrised representation
  (:class:`GaussianKL`, textbook KL to N(0, 1); the seed's own form differs, see docstring),
  and optional adversarial prior matching on ``G`` (:class:`PriorMatchingLoss`, weight 0 in
  the paper).

Mutual-information estimators: ``"jsd"`` (Jensen-Shannon, softplus form:
``softplus(-T_pos) + softplus(T_neg)``, the seed's) and ``"infonce"`` (cross-entropy of the
positive against the negatives).

The views the critics score and the engineered negatives are built in
:mod:`matbench_dim.model.negatives`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from matbench_dim.model import fused, kernels
from matbench_dim.model.layout import to_rows
from matbench_dim.model.negatives import (
    GLOBAL_FALSE_LOCALS,
    LOCAL_NEGATIVES,
    PairView,
    RowPairView,
    engineered_false_locals,
    local_views,
)
from matbench_dim.model.regularizers import DIMProbes, GaussianKL, PriorMatchingLoss
from matbench_dim.model.sitenet import SiteNetEncoder, activation_name, masked_mean, projection

ESTIMATORS = ("jsd", "infonce")


@dataclass(frozen=True)
class DIMConfig:
    """Hyperparameters of the DIM objective (defaults: the seed's published values).

    Attributes
    ----------
    estimator
        Mutual-information estimator: ``"jsd"`` (seed) or ``"infonce"``.
    weight_local
        Weight of the local stage (local DIM + its KL).
    weight_global
        Weight of the global stage (global DIM + its KL + prior matching).
    weight_kl
        Weight of the Gaussian KL penalty on each stage [0.1].
    weight_prior
        Weight of adversarial prior matching on ``G`` [0: unused in the paper].
    extra_false_samples
        Add the engineered false local vectors to the global negatives (the paper credits
        them for the formation-energy gain) and the engineered pair rows to the local ones.
    critic_dim
        Width of the dot-product space of both critics [128].
    critic_hidden
        Hidden width of each critic's projections [64].
    """

    estimator: str = "jsd"
    weight_local: float = 1.0
    weight_global: float = 1.0
    weight_kl: float = 0.1
    weight_prior: float = 0.0
    extra_false_samples: bool = True
    critic_dim: int = 128
    critic_hidden: int = 64

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"dim estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for name in ("weight_local", "weight_global", "weight_kl", "weight_prior"):
            if getattr(self, name) < 0:
                raise ValueError(f"dim {name} must be >= 0, got {getattr(self, name)}")
        if self.critic_dim < 1 or self.critic_hidden < 1:
            raise ValueError("dim critic_dim and critic_hidden must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the configuration."""
        return asdict(self)


class LossOutput(NamedTuple):
    """A scalar loss and the critic's accuracy at telling positives from negatives.

    ``parts`` holds the accuracy on the positives (``"pos"``) and on each kind of negative
    (``"neg_<kind>"``) separately; ``accuracy`` is ``(pos + mean of the negatives) / 2``.
    """

    loss: Tensor
    accuracy: Tensor
    parts: dict[str, Tensor] | None = None


def _negative_names(names: tuple[str, ...], k: int) -> list[str]:
    return list(names[:k]) if k <= len(names) else [f"neg_{i}" for i in range(k)]


def participation_ratio(x: Any) -> float:
    """Effective rank of a cloud of vectors: ``(sum l)^2 / sum l^2`` over the eigenvalues
    ``l`` of their covariance (1 when all variance lies on one axis, ``d`` when it is
    isotropic in ``d`` dimensions).

    Computed without an eigendecomposition, as ``tr(C)^2 / ||C||_F^2``. ``x`` is ``(n, d)``
    (array or tensor); NaN when ``n < 2`` or every vector is the same.
    """
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else x
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"participation_ratio needs an (n, d) array, got shape {a.shape}")
    if a.shape[0] < 2:
        return math.nan
    c = a - a.mean(0)
    cov = c.T @ c / (a.shape[0] - 1)
    frob2 = float((cov * cov).sum())
    if not frob2 > 0:
        return math.nan
    return float(np.trace(cov) ** 2 / frob2)


def per_crystal_mean(per_site: Tensor, site_mask: Tensor) -> Tensor:
    """Mean over each crystal's real sites, then over crystals: ``(B, P) -> ()``."""
    return masked_mean(per_site, site_mask, dim=1).mean()


def per_crystal_mean_rows(per_row: Tensor, row_crystal: Tensor) -> Tensor:
    """Mean over each crystal's rows, then over crystals: ``(R,) -> ()``."""
    n = int(row_crystal.max()) + 1
    sums = per_row.new_zeros(n).index_add(0, row_crystal, per_row)
    counts = per_row.new_zeros(n).index_add(0, row_crystal, torch.ones_like(per_row))
    present = counts > 0
    return (sums[present] / counts[present]).mean()


class _DotCritic(nn.Module):
    """Separable critic ``T(a, b) = <f(a), g(b)>`` and the MI estimator that scores it."""

    def __init__(
        self,
        n_left: int,
        n_right: int,
        critic_dim: int = 128,
        critic_hidden: int = 64,
        estimator: str = "jsd",
        activation: str = "mish",
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.f = projection(n_left, critic_hidden, critic_dim, activation)
        self.g = projection(n_right, critic_hidden, critic_dim, activation)


class LocalDIMLoss(_DotCritic):
    """Local DIM: site vector ``z_i`` vs its weighted pair rows, against negative rows.

    Constructor (:class:`_DotCritic`): ``n_left`` = width of ``z`` (local_dim), ``n_right`` =
    width of a pair row entry ``[s_j, d_ij]`` (site features + 1), critic sizes, estimator
    (``"jsd"`` or ``"infonce"``), activation.
    """

    def scores(self, z: Tensor, view: PairView) -> Tensor:
        """Critic scores ``T(z_i, u_ij) = <f(z_i), g(u_ij)>``: ``(R, S)``.

        ``g``'s last linear layer is folded into the per-row side
        (``<f, W a + b> = <W^T f, a> + <f, b>``), so no ``critic_dim``-wide tensor is built
        per pair.
        """
        return self.all_scores(z, [view])[0]

    def all_scores(self, z: Tensor, views: list[PairView | RowPairView]) -> list[Tensor]:
        """:meth:`scores` of several views of the same rows, sharing the work they share.

        - ``g``'s last layer is folded into the per-row side, as in :meth:`scores`;
        - for :class:`RowPairView` s of one :class:`PairRows`, ``g``'s first layer is split
          into its site part, applied once per site (``W_s s_j + b``, then gathered), and its
          distance part (``w_d d_ij``), and the view that borrows both species and distances
          reuses the embedded rows of the view that borrows neither
          (``hidden_neg[r] = hidden_pos[src[r]]``).
        """
        fz = self.f(z)  # (R, C)
        first, act, last = self.g[0], self.g[1], self.g[2]
        q = (fz @ last.weight)[:, :, None]  # (R, H, 1)
        c = (fz @ last.bias)[:, None]  # (R, 1)
        rows = views[0].rows if isinstance(views[0], RowPairView) else None
        structured = rows is not None and all(
            isinstance(v, RowPairView) and v.rows is rows for v in views
        )
        if not structured:
            return [torch.bmm(act(first(v.features)), q)[..., 0] + c for v in views]
        assert rows is not None
        site_part = F.linear(rows.site_rows, first.weight[:, :-1], first.bias)  # (R, H)
        w_d = first.weight[:, -1].contiguous()  # a strided vector would defeat vectorisation
        idx, d, src = rows.neighbour_index, rows.distances, rows.src
        act_name = activation_name(act)
        if act_name is not None and fused.use_fused(site_part, idx.numel() * site_part.shape[-1]):
            # compiled: one fused pass per view, recomputed in backward (cheaper than storing)
            out = []
            for v in views:
                args = (
                    site_part,
                    idx[src] if v.borrow_species else idx,
                    d[src] if v.borrow_distances else d,
                    w_d,
                    q[..., 0],
                    c,
                    act_name,
                )
                out.append(kernels.CriticView.apply(*args))
            return out
        hidden: dict[tuple[bool, bool], Tensor] = {}

        def embedded(borrow_species: bool, borrow_distances: bool) -> Tensor:
            key = (borrow_species, borrow_distances)
            if key not in hidden:
                if key == (True, True):
                    hidden[key] = embedded(False, False)[src]
                else:
                    x = F.embedding(idx[src] if borrow_species else idx, site_part)
                    dv = d[src] if borrow_distances else d
                    hidden[key] = act(x.addcmul_(dv[..., None], w_d))
            return hidden[key]

        return [
            torch.bmm(embedded(v.borrow_species, v.borrow_distances), q)[..., 0] + c for v in views
        ]

    def forward(
        self,
        z: Tensor,
        positive: PairView | RowPairView,
        negatives: list[PairView | RowPairView],
        row_crystal: Tensor,
    ) -> LossOutput:
        """Loss over a batch (mean over each crystal's sites, then over crystals).

        Parameters
        ----------
        z
            ``(R, local_dim)`` local vectors of the rows.
        positive
            The rows' own pair rows.
        negatives
            ``K >= 1`` views of negative pair rows, averaged.
        row_crystal
            ``(R,)`` long, crystal of each row.
        """
        t_pos, *t_neg = self.all_scores(z, [positive, *negatives])
        with torch.no_grad():
            acc_pos = (positive.weights * (t_pos > 0)).sum(-1)
            acc_neg = torch.stack(
                [(v.weights * (t < 0)).sum(-1) for v, t in zip(negatives, t_neg, strict=True)]
            )
            accuracy = per_crystal_mean_rows(0.5 * (acc_pos + acc_neg.mean(0)), row_crystal)
            names = _negative_names(LOCAL_NEGATIVES, len(negatives))
            parts = {"pos": per_crystal_mean_rows(acc_pos, row_crystal)}
            parts.update(
                {
                    k: per_crystal_mean_rows(a, row_crystal)
                    for k, a in zip(names, acc_neg, strict=True)
                }
            )
        if self.estimator == "jsd":
            pos = (positive.weights * F.softplus(-t_pos)).sum(-1)
            neg = torch.stack(
                [(v.weights * F.softplus(t)).sum(-1) for v, t in zip(negatives, t_neg, strict=True)]
            ).mean(0)
            return LossOutput(per_crystal_mean_rows(pos + neg, row_crystal), accuracy, parts)
        s_pos = (positive.weights * t_pos).sum(-1)
        s_neg = [(v.weights * t).sum(-1) for v, t in zip(negatives, t_neg, strict=True)]
        logits = torch.stack([s_pos, *s_neg], dim=-1)
        nll = -torch.log_softmax(logits, dim=-1)[..., 0]
        return LossOutput(per_crystal_mean_rows(nll, row_crystal), accuracy, parts)


class GlobalDIMLoss(_DotCritic):
    """Global DIM: crystal vector ``G`` vs the crystal's local vectors, against negatives.

    Negatives of a local vector ``z_qi`` are the other crystals' ``G_b`` (``b != q``) and,
    when given, engineered false local vectors paired with the crystal's own ``G``. Constructor:
    ``n_left`` = global_dim, ``n_right`` = local_dim (see :class:`_DotCritic`).
    """

    def forward(
        self,
        g: Tensor,
        z: Tensor,
        site_mask: Tensor,
        false_locals: list[tuple[Tensor, Tensor]] | None = None,
    ) -> LossOutput:
        """Loss over a batch.

        Parameters
        ----------
        g
            ``(B, global_dim)`` crystal vectors.
        z
            ``(B, P, local_dim)`` local vectors: in pretraining, the detached local means.
        site_mask
            ``(B, P)`` bool.
        false_locals
            Engineered negatives: ``(z_false (B, P', local_dim), mask (B, P'))`` pairs, each
            scored against the crystal's own ``G``.
        """
        false_locals = false_locals or []
        fg = self.f(g)
        # all[b, q, p] = T(G_b, z_qp)
        all_scores = torch.einsum("bc,qpc->bqp", fg, self.g(z))
        n = g.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=g.device)
        t_pos = all_scores.diagonal(dim1=0, dim2=1).transpose(0, 1)  # (B, P): T(G_q, z_qp)
        t_false = [torch.einsum("bc,bpc->bp", fg, self.g(zf)) for zf, _ in false_locals]
        others = ~eye[:, :, None].expand_as(all_scores)  # b != q
        if self.estimator == "jsd":
            pos = per_crystal_mean(F.softplus(-t_pos), site_mask)
            neg_terms = []
            if n > 1:
                # mean over the other crystals' G, per local vector, then per crystal
                per_site = (F.softplus(all_scores) * others).sum(0) / (n - 1)
                neg_terms.append(per_crystal_mean(per_site, site_mask))
            neg_terms += [
                per_crystal_mean(F.softplus(t), m)
                for t, (_, m) in zip(t_false, false_locals, strict=True)
            ]
            neg = torch.stack(neg_terms).mean() if neg_terms else t_pos.new_zeros(())
            loss = pos + neg
        else:
            # per local vector: softmax over [own G, other crystals' G, own G with false z]
            cols = [all_scores.permute(1, 2, 0)]  # (q, p, b): T(G_b, z_qp)
            cols += [
                torch.where(m, t, torch.full_like(t, float("-inf")))[..., None]
                for t, (_, m) in zip(t_false, false_locals, strict=True)
                if t.shape[1] == z.shape[1]
            ]
            logits = torch.cat(cols, dim=-1)
            target = torch.arange(n, device=g.device)[:, None].expand(-1, z.shape[1])
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
            )
            loss = per_crystal_mean(nll.reshape(target.shape), site_mask)
        with torch.no_grad():
            accs = [per_crystal_mean((t_pos > 0).float(), site_mask)]
            parts = {"pos": accs[0]}
            neg_accs = []
            if n > 1:
                neg_accs.append(
                    per_crystal_mean(((all_scores < 0) & others).sum(0) / (n - 1), site_mask)
                )
                parts["neg_other"] = neg_accs[0]
            false_accs = [
                per_crystal_mean((t < 0).float(), m)
                for t, (_, m) in zip(t_false, false_locals, strict=True)
            ]
            names = _negative_names(GLOBAL_FALSE_LOCALS, len(false_accs))
            parts.update(zip(names, false_accs, strict=True))
            neg_accs += false_accs
            if neg_accs:
                accs.append(torch.stack(neg_accs).mean())
            accuracy = torch.stack(accs).mean()
        return LossOutput(loss, accuracy, parts)


class DIMObjective(nn.Module):
    """Everything trained by DIM besides the encoder: critics, prior discriminator, probes.

    ``forward`` runs the encoder on a batch and returns the stage losses and diagnostics.
    Parameter groups for the separate optimisers: :meth:`local_parameters`,
    :meth:`global_parameters`, :meth:`probe_parameters` (plus the encoder's own stages).
    """

    def __init__(self, cfg: DIMConfig, encoder_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.local_loss = LocalDIMLoss(
            encoder_cfg.local_dim,
            encoder_cfg.site_features + 1,
            cfg.critic_dim,
            cfg.critic_hidden,
            cfg.estimator,
            encoder_cfg.activation,
        )
        self.global_loss = GlobalDIMLoss(
            encoder_cfg.global_dim,
            encoder_cfg.local_dim,
            cfg.critic_dim,
            cfg.critic_hidden,
            cfg.estimator,
            encoder_cfg.activation,
        )
        self.kl = GaussianKL()
        self.prior = PriorMatchingLoss(encoder_cfg.global_dim, cfg.critic_hidden)
        self.probes = DIMProbes(
            encoder_cfg.global_dim, encoder_cfg.local_dim, encoder_cfg.site_features
        )

    def local_parameters(self) -> list[nn.Parameter]:
        return list(self.local_loss.parameters())

    def global_parameters(self) -> list[nn.Parameter]:
        return list(self.global_loss.parameters()) + list(self.prior.parameters())

    def probe_parameters(self) -> list[nn.Parameter]:
        return list(self.probes.parameters())

    def forward(
        self,
        encoder: SiteNetEncoder,
        batch: Any,
        generator: torch.Generator | None = None,
        targets: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One DIM pass.

        Returns
        -------
        dict
            ``loss`` (the sum to back-propagate: the stages are independent by construction,
            so one backward pass gives each optimiser its own stage's gradient),
            ``dim_local``, ``dim_global``, ``kl_local``, ``kl_global``, ``prior``,
            ``acc_local``, ``acc_global``, the critics' accuracy on the positives and on each
            kind of negative (``acc_local_pos``, ``acc_local_neg_row``, ...,
            ``acc_global_neg_permuted``; see :data:`LOCAL_NEGATIVES`,
            :data:`GLOBAL_FALSE_LOCALS`) and the probes' losses.
        """
        cfg = self.cfg
        out = encoder(batch, sample=True, detach_local=True, generator=generator)
        mask = out.site_mask
        site_rows = encoder.local.standardise(to_rows(batch.site_features, mask))
        pos, negs = local_views(site_rows, out.pairs, cfg.extra_false_samples)
        local = self.local_loss(out.local[mask], pos, negs, out.pairs.row_crystal)
        kl_local = self.kl(out.local_mu, out.local_logvar, mask)
        false_locals = (
            engineered_false_locals(encoder, batch, out.pairs, generator, out.pair_terms)
            if cfg.extra_false_samples
            else []
        )
        # the global critic's local side: detached means, like the global encoder's input and
        # the engineered false locals (the sample out.local is for the local critic only)
        glob = self.global_loss(out.global_, out.local_mu.detach(), mask, false_locals)
        kl_global = self.kl(out.global_mu, out.global_logvar)
        prior = self.prior(out.global_, generator) if cfg.weight_prior > 0 else kl_global * 0
        probes = self.probes(out, batch.site_features, targets)
        stage_local = local.loss + cfg.weight_kl * kl_local
        stage_global = glob.loss + cfg.weight_kl * kl_global + cfg.weight_prior * prior
        probe_loss = sum(v for k, v in probes.items() if not k.endswith("_mae"))
        total = cfg.weight_local * stage_local + cfg.weight_global * stage_global + probe_loss
        return {
            "loss": total,
            "dim_loss": (stage_local + stage_global).detach(),
            "dim_local": local.loss.detach(),
            "dim_global": glob.loss.detach(),
            "kl_local": kl_local.detach(),
            "kl_global": kl_global.detach(),
            "prior": prior.detach(),
            "acc_local": local.accuracy.detach(),
            "acc_global": glob.accuracy.detach(),
            **{f"acc_local_{k}": v.detach() for k, v in (local.parts or {}).items()},
            **{f"acc_global_{k}": v.detach() for k, v in (glob.parts or {}).items()},
            **{k: v.detach() for k, v in probes.items()},
        }
