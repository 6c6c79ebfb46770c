"""Frozen reference: the encoder and DIM critic internals as they were before the speed work.

A slow, literal copy of the code of commit 17ca069 (``matbench_dim/model/sitenet.py`` and
``matbench_dim/model/dim.py``): ATen's mish, the attention's values projected per pair, the
local critic's first layer applied to materialised ``(R, S, F + 1)`` pair rows (four of
them), and three full local passes for the engineered negatives. It is *not* used by the
package; :func:`reference_internals` swaps it in for the optimised internals, so that the same
``DIMObjective`` / ``SiteNetEncoder`` objects (same parameters, same random draws, same
orchestration in ``DIMObjective.forward``) run either implementation:

    with reference_internals():
        out = objective(encoder, batch, generator)   # the old, slow internals

Used by ``tests/model/test_dim_step_equivalence.py`` (losses and gradients must agree) and by
``benchmarks/bench_encoder.py`` (speed-up, measured side by side).

What is swapped: ``Mish.forward`` (-> ``torch.nn.functional.mish``),
``AttentionBlock.forward``, ``LocalEncoder.encode``, ``LocalDIMLoss.forward``, and the module
functions ``local_views`` and ``engineered_false_locals`` of ``matbench_dim.model.dim``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from matbench_dim.model import dim as dim_module
from matbench_dim.model import sitenet
from matbench_dim.model.dim import LocalDIMLoss, LossOutput, per_crystal_mean_rows
from matbench_dim.model.layout import PairInputs, to_padded, to_rows
from matbench_dim.model.negatives import PairView, distance_weights, roll_shift, rolled_rows
from matbench_dim.model.sitenet import AttentionBlock, LocalEncoder

# --------------------------------------------------------------------------- encoder


def _ref_mish(self: Any, input: Tensor) -> Tensor:
    return F.mish(input)


def _ref_block_forward(
    self: AttentionBlock,
    h: Tensor,
    neighbour_index: Tensor,
    pair: Tensor,
    pair_mask: Tensor,
    projected_pair: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r, s = neighbour_index.shape
    hidden = self.w_site(h)[:, None, :] + self.w_neighbour(h)[neighbour_index] + self.w_pair(pair)
    hidden = self.act(hidden)
    hl, hv = hidden.split(self.hidden, dim=-1)
    logits = self.logits(self.norm_logits(hl)).masked_fill(~pair_mask[..., None], float("-inf"))
    weights = torch.softmax(logits, dim=1)
    values = self.dropout(self.values(self.norm_values(hv))).reshape(
        r, s, self.heads, self.head_dim
    )
    x = (weights[..., None] * values).sum(dim=1).reshape(r, -1)
    return self.out(x), weights


def _ref_local_encode(
    self: LocalEncoder,
    site_features: Tensor,
    neighbour_index: Tensor,
    distances: Tensor,
    pair_mask: Tensor,
    atomic_numbers: Tensor | None = None,
    pair_terms: Any = None,
) -> tuple[Tensor, Tensor, None]:
    h = self.site_embed(self.standardise(site_features))
    z_i = z_j = None
    if self.cfg.coulomb:
        if atomic_numbers is None:
            raise ValueError("coulomb pair features need atomic numbers")
        z = atomic_numbers.to(distances.dtype)
        z_i = z[:, None].expand_as(distances)
        z_j = z[neighbour_index]
    e = self.pair_embed(self.pair_features(distances, z_i, z_j))
    for k, block in enumerate(self.blocks):
        update, _ = block(h, neighbour_index, e, pair_mask)
        h = update if k == 0 else h + update
    return self.mu(h), self.logvar(h), None


# --------------------------------------------------------------------------- DIM critic


def _ref_scores(self: LocalDIMLoss, z: Tensor, view: PairView) -> Tensor:
    fz = self.f(z)  # (R, C)
    first, act, last = self.g[0], self.g[1], self.g[2]
    hidden = act(first(view.features))  # (R, S, H)
    return torch.einsum("rh,rsh->rs", fz @ last.weight, hidden) + (fz @ last.bias)[:, None]


def _ref_local_forward(
    self: LocalDIMLoss, z: Tensor, positive: Any, negatives: list[Any], row_crystal: Tensor
) -> LossOutput:
    positive = PairView(positive.features, positive.weights)
    negatives = [PairView(v.features, v.weights) for v in negatives]
    t_pos = _ref_scores(self, z, positive)
    t_neg = [_ref_scores(self, z, v) for v in negatives]
    with torch.no_grad():
        acc_pos = (positive.weights * (t_pos > 0)).sum(-1)
        acc_neg = torch.stack(
            [(v.weights * (t < 0)).sum(-1) for v, t in zip(negatives, t_neg, strict=True)]
        )
        accuracy = per_crystal_mean_rows(0.5 * (acc_pos + acc_neg.mean(0)), row_crystal)
    if self.estimator == "jsd":
        pos = (positive.weights * F.softplus(-t_pos)).sum(-1)
        neg = torch.stack(
            [(v.weights * F.softplus(t)).sum(-1) for v, t in zip(negatives, t_neg, strict=True)]
        ).mean(0)
        return LossOutput(per_crystal_mean_rows(pos + neg, row_crystal), accuracy)
    s_pos = (positive.weights * t_pos).sum(-1)
    s_neg = [(v.weights * t).sum(-1) for v, t in zip(negatives, t_neg, strict=True)]
    logits = torch.stack([s_pos, *s_neg], dim=-1)
    nll = -torch.log_softmax(logits, dim=-1)[..., 0]
    return LossOutput(per_crystal_mean_rows(nll, row_crystal), accuracy)


def reference_local_views(
    site_rows: Tensor, pairs: PairInputs, extra_false_samples: bool = True
) -> tuple[PairView, list[PairView]]:
    """The old ``local_views``: materialised ``(R, S, F + 1)`` pair rows."""
    species = site_rows[pairs.neighbour_index]  # (R, S, F)
    d = pairs.distances
    valid = pairs.pair_mask
    pos = PairView(torch.cat([species, d[..., None]], -1), distance_weights(d, valid))
    src = rolled_rows(pairs, roll_shift(pairs.n_sites.shape[0]))
    r_species, r_d, r_valid = species[src], d[src], valid[src]
    negatives = [
        PairView(torch.cat([r_species, r_d[..., None]], -1), distance_weights(r_d, r_valid))
    ]
    if extra_false_samples:
        both = valid & r_valid
        negatives.append(
            PairView(torch.cat([species, r_d[..., None]], -1), distance_weights(r_d, both))
        )
        negatives.append(
            PairView(torch.cat([r_species, d[..., None]], -1), distance_weights(d, both))
        )
    return pos, negatives


def reference_engineered_false_locals(
    encoder: Any,
    batch: Any,
    pairs: PairInputs,
    generator: torch.Generator | None = None,
    pair_terms: Any = None,
) -> list[tuple[Tensor, Tensor]]:
    """The old ``engineered_false_locals``: three full local passes (``pair_terms`` ignored)."""
    site_mask = batch.prim_mask
    n = site_mask.shape[0]
    shift = roll_shift(n)
    site_rows = to_rows(batch.site_features, site_mask)
    z_rows = to_rows(batch.atomic_numbers, site_mask)
    local = encoder.local
    geometry = (pairs.neighbour_index, pairs.distances, pairs.pair_mask)
    out: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        src = rolled_rows(pairs, shift)
        mu, _ = local(site_rows[src], *geometry, z_rows[src])
        out.append((to_padded(mu, site_mask), site_mask))
        src = rolled_rows(pairs, -shift)
        mu, _ = local(site_rows[src], *geometry, z_rows[src])
        rolled = (torch.arange(n, device=site_mask.device) + shift) % n
        out.append((to_padded(mu, site_mask)[rolled], site_mask[rolled]))
        keys = torch.rand(batch.super_mask.shape, generator=generator).to(site_mask.device)
        keys = keys.masked_fill(~batch.super_mask, 2.0)
        image_perm = torch.gather(batch.image_of, 1, keys.argsort(dim=1))
        index = pairs.offsets[pairs.row_crystal][:, None] + image_perm[pairs.row_crystal]
        mu, _ = local(site_rows, index, pairs.distances, pairs.pair_mask, z_rows)
        out.append((to_padded(mu, site_mask), site_mask))
    return out


# --------------------------------------------------------------------------- the switch

_SWAPS: list[tuple[Any, str, Any]] = [
    (sitenet.Mish, "forward", _ref_mish),
    (AttentionBlock, "forward", _ref_block_forward),
    (LocalEncoder, "encode", _ref_local_encode),
    (LocalDIMLoss, "forward", _ref_local_forward),
    (dim_module, "local_views", reference_local_views),
    (dim_module, "engineered_false_locals", reference_engineered_false_locals),
]


@contextlib.contextmanager
def reference_internals() -> Iterator[None]:
    """Run the frozen reference internals inside the ``with`` block (not thread-safe)."""
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in _SWAPS]
    try:
        for owner, name, fn in _SWAPS:
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
