"""The local critic's views and the engineered negatives of DIM on Site-Net.

The samples that :mod:`matbench_dim.model.dim` scores, built from a batch in the row layout
(:mod:`matbench_dim.model.layout`):

- pair views (:class:`PairView`, or :class:`RowPairView`: the recipe of one without its
  ``(R, S, F + 1)`` rows) and their distance weights ``(d_ij + 1)^-2``;
- :func:`local_views`: the positive rows and the local negatives, which borrow the pair row
  of a site of another crystal (the batch rolled by half its crystals, :func:`rolled_rows`);
- :func:`engineered_false_locals`: the seed's "extra false samples", local vectors of
  corrupted crystals for the global critic.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from matbench_dim.model.layout import PairInputs, to_padded, to_rows
from matbench_dim.model.sitenet import SiteNetEncoder

LOCAL_NEGATIVES = ("neg_row", "neg_distances", "neg_species")
"""Names of the local critic's negatives, in :func:`local_views` order: another site's whole
pair row, own species at borrowed distances, borrowed species at own distances."""

GLOBAL_FALSE_LOCALS = ("neg_composition", "neg_structure", "neg_permuted")
"""Names of the engineered global negatives, in :func:`engineered_false_locals` order (the
other-crystal negative is ``"neg_other"``)."""


class PairView(NamedTuple):
    """Pair rows shown to the local critic: ``features (R, S, F + 1)``, ``weights (R, S)``.

    ``R`` rows are unique sites (see :class:`~matbench_dim.model.layout.PairInputs`).
    Weights are zero on invalid pairs and sum to one over ``S`` for every row.
    """

    features: Tensor
    weights: Tensor


class PairRows(NamedTuple):
    """What the local critic's pair rows are made of, in the row layout.

    The entry ``(r, s)`` of a view is ``[site_rows[idx], distances[r', s]]`` where ``idx`` is
    ``neighbour_index[r, s]`` or, for borrowed species, ``neighbour_index[src[r], s]``, and
    ``r'`` is ``r`` or, for borrowed distances, ``src[r]``.
    """

    site_rows: Tensor
    """``(R, F)`` (standardised) site features."""
    neighbour_index: Tensor
    """``(R, S)`` long."""
    distances: Tensor
    """``(R, S)``."""
    src: Tensor
    """``(R,)`` long: the row that lends its species and/or distances to row ``r``."""


class RowPairView(NamedTuple):
    """A :class:`PairView` given by its recipe (:class:`PairRows` and what is borrowed).

    :class:`LocalDIMLoss` scores such views without building the ``(R, S, F + 1)`` rows:
    the critic's first layer is applied to the site features once per site, and views that
    share species or distances share that work. ``features`` builds the rows on demand.
    """

    rows: PairRows
    borrow_species: bool
    borrow_distances: bool
    weights: Tensor

    @property
    def features(self) -> Tensor:
        """The materialised ``(R, S, F + 1)`` pair rows."""
        rows = self.rows
        idx = rows.neighbour_index[rows.src] if self.borrow_species else rows.neighbour_index
        d = rows.distances[rows.src] if self.borrow_distances else rows.distances
        return torch.cat([rows.site_rows[idx], d[..., None]], -1)


def distance_weights(distances: Tensor, valid: Tensor) -> Tensor:
    """``(d + 1)^-2`` on valid pairs, normalised over the last axis; ``(..., S)``."""
    w = (distances + 1.0).pow(-2) * valid.to(distances.dtype)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


def roll_shift(n_crystals: int) -> int:
    """Roll by half the batch (the seed's choice): 0 only when there is one crystal."""
    return n_crystals // 2


def rolled_rows(pairs: PairInputs, shift: int) -> Tensor:
    """Source row of each row's negative: crystal ``(c + shift) % B``, its site ``i mod P'``.

    Returns an ``(R,)`` long tensor of row indices.
    """
    n = pairs.n_sites.shape[0]
    src = (pairs.row_crystal + shift) % n
    return pairs.offsets[src] + pairs.row_site % pairs.n_sites[src]


def local_views(
    site_rows: Tensor, pairs: PairInputs, extra_false_samples: bool = True
) -> tuple[RowPairView, list[RowPairView]]:
    """The positive pair rows and the negative rows of the local DIM.

    Parameters
    ----------
    site_rows
        ``(R, F)`` (standardised) features of the unique sites.
    pairs
        Row-layout geometry of the batch.
    extra_false_samples
        Add own species with borrowed distances and borrowed species with own distances to
        the borrowed whole row.

    Returns
    -------
    tuple
        ``(positive, negatives)``, as :class:`RowPairView` s of one :class:`PairRows` (their
        ``features`` give the literal rows).
    """
    d = pairs.distances
    valid = pairs.pair_mask
    src = rolled_rows(pairs, roll_shift(pairs.n_sites.shape[0]))
    rows = PairRows(site_rows, pairs.neighbour_index, d, src)
    pos_weights = distance_weights(d, valid)
    pos = RowPairView(rows, False, False, pos_weights)
    # the whole row of another site: its weights are that row's own
    negatives = [RowPairView(rows, True, True, pos_weights[src])]
    if extra_false_samples:
        both = valid & valid[src]
        negatives.append(RowPairView(rows, False, True, distance_weights(d[src], both)))
        negatives.append(RowPairView(rows, True, False, distance_weights(d, both)))
    return pos, negatives


def engineered_false_locals(
    encoder: SiteNetEncoder,
    batch: Any,
    pairs: PairInputs,
    generator: torch.Generator | None = None,
    pair_terms: list[Tensor] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """The seed's "extra false samples": local vectors of corrupted crystals (no gradient).

    For crystal ``b`` and ``r = (b + B // 2) % B``:

    1. wrong composition, right structure: ``b``'s geometry with ``r``'s species
       (site ``k`` takes the species of ``r``'s site ``k mod P_r``);
    2. right composition, wrong structure: ``r``'s geometry with ``b``'s species;
    3. permuted interactions: ``b``'s own sites with the columns ``j`` shuffled, so each
       neighbour appears at another neighbour's distance.

    All three keep the batch's distances in place, so without the Coulomb pair term (which
    depends on the species) they share the pair embedding of the geometry: ``pair_terms``
    (``EncoderOutput.pair_terms`` of the encoder's pass on this batch) when given, otherwise
    computed once here. With an even number of crystals, 1 and 2 are the same corrupted
    crystals (``b - B/2 = b + B/2`` mod ``B``) paired with different ``G``: one pass serves both.

    Returns
    -------
    list
        ``(z_false (B, P, local_dim), mask (B, P))`` for each kind, to pair with ``G_b``.
    """
    site_mask = batch.prim_mask
    n = site_mask.shape[0]
    shift = roll_shift(n)
    site_rows = to_rows(batch.site_features, site_mask)
    z_rows = to_rows(batch.atomic_numbers, site_mask)
    local = encoder.local
    geometry = (pairs.neighbour_index, pairs.distances, pairs.pair_mask)
    out: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        if encoder.cfg.coulomb:
            pair_terms = None
        elif pair_terms is None:
            pair_terms = local.pair_terms(pairs.distances)
        # 1. r's species on b's geometry
        src = rolled_rows(pairs, shift)
        mu, _ = local(site_rows[src], *geometry, z_rows[src], pair_terms)
        out.append((to_padded(mu, site_mask), site_mask))
        # 2. b's species on r's geometry: rows of crystal c take the species of c - shift,
        #    and the result is paired with G of crystal c - shift, i.e. b's row of r = b + shift.
        #    With an even number of crystals, c - shift = c + shift (mod B): the same input
        #    as pass 1, whose local vectors are then reused (the same numbers, one pass fewer;
        #    not with dropout in training, which would draw its own mask for pass 2)
        src_back = rolled_rows(pairs, -shift)
        stochastic = local.training and encoder.cfg.dropout > 0
        if stochastic or not torch.equal(src_back, src):
            mu, _ = local(site_rows[src_back], *geometry, z_rows[src_back], pair_terms)
        rolled = (torch.arange(n, device=site_mask.device) + shift) % n
        out.append((to_padded(mu, site_mask)[rolled], site_mask[rolled]))
        # 3. columns shuffled within each crystal's real supercell sites
        keys = torch.rand(batch.super_mask.shape, generator=generator).to(site_mask.device)
        keys = keys.masked_fill(~batch.super_mask, 2.0)
        image_perm = torch.gather(batch.image_of, 1, keys.argsort(dim=1))
        index = pairs.offsets[pairs.row_crystal][:, None] + image_perm[pairs.row_crystal]
        mu, _ = local(site_rows, index, pairs.distances, pairs.pair_mask, z_rows, pair_terms)
        out.append((to_padded(mu, site_mask), site_mask))
    return out
