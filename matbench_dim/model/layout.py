"""The row layout of a batch: unique sites as rows, supercell sites as columns.

:class:`~matbench_dim.features.featurize.Batch` is padded per crystal (``(B, P, ...)`` unique
sites, ``(B, S, ...)`` supercell sites); the attention and the local DIM critic work on the
``R`` real unique sites of the batch instead (:class:`PairInputs`), which drops the padding
rows. :func:`to_rows` and :func:`to_padded` convert per-site values between the two.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from matbench_dim.model.geometry import minimum_image_distances


class PairInputs(NamedTuple):
    """Geometry of a batch in the *row* layout used by the attention.

    Rows are the ``R`` real unique sites of the batch (crystal by crystal, in the order of
    ``batch.prim_mask``'s True entries); columns are the ``S`` supercell-site slots of the
    row's crystal (padded to the batch's largest supercell). Padding unique sites are
    dropped, which on real data saves 2-4x compared with a ``(B, P, S)`` layout.
    """

    distances: Tensor
    """``(R, S)`` minimum-image distances in Angstrom, 0 on padding columns."""
    pair_mask: Tensor
    """``(R, S)`` bool, True on the row crystal's real supercell sites."""
    neighbour_index: Tensor
    """``(R, S)`` long: the row (unique site) that each column is an image of."""
    row_crystal: Tensor
    """``(R,)`` long: crystal of each row."""
    row_site: Tensor
    """``(R,)`` long: position of each row among its crystal's unique sites."""
    offsets: Tensor
    """``(B,)`` long: first row of each crystal."""
    n_sites: Tensor
    """``(B,)`` long: unique sites of each crystal."""


def pair_inputs(batch: Any) -> PairInputs:
    """Compute the row-layout pair geometry of a :class:`~matbench_dim.features.featurize.Batch`."""
    rows = batch.prim_mask.nonzero()
    row_crystal, row_site = rows[:, 0], rows[:, 1]
    n_sites = batch.prim_mask.sum(1)
    offsets = torch.cumsum(n_sites, 0) - n_sites
    d = minimum_image_distances(
        batch.prim_coords[row_crystal, row_site][:, None, :],
        batch.super_coords[row_crystal],
        batch.lattice[row_crystal],
    )[:, 0, :]
    mask = batch.super_mask[row_crystal]
    d = torch.where(mask, d, torch.zeros_like(d))
    idx = offsets[row_crystal][:, None] + batch.image_of[row_crystal]
    return PairInputs(d, mask, idx, row_crystal, row_site, offsets, n_sites)


def to_rows(x: Tensor, site_mask: Tensor) -> Tensor:
    """Padded per-site values ``(B, P, ...)`` -> rows ``(R, ...)``."""
    return x[site_mask]


def to_padded(rows: Tensor, site_mask: Tensor) -> Tensor:
    """Rows ``(R, D)`` -> padded ``(B, P, D)`` with zeros on padding sites."""
    out = rows.new_zeros((*site_mask.shape, rows.shape[-1]))
    out[site_mask] = rows
    return out
