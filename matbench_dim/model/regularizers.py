"""The terms beside the two DIM critics: the Gaussian KL penalty, prior matching through a
gradient-reversal layer, and the detached probes (composition, site features, property) that
monitor what the representation holds without training it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from matbench_dim.model.sitenet import (
    EncoderOutput,
    masked_mean,
    projection,
)


class GaussianKL(nn.Module):
    """Mean KL divergence ``KL(N(mu, exp(logvar)) || N(0, 1))`` per dimension.

    The textbook form ``0.5 (mu^2 + exp(logvar) - 1 - logvar)``, averaged over dimensions and
    over valid rows. (The seed's code uses ``0.5 mu^2 + exp(logvar) - logvar``, which has the
    same minimiser for ``mu`` but a different scale for the variance; we use the textbook one.)
    """

    def forward(self, mu: Tensor, logvar: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mu``, ``logvar``: ``(..., D)``; ``mask``: ``(...)`` bool or None -> scalar."""
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean(-1)
        if mask is None:
            return kl.mean()
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1.0)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


class PriorMatchingLoss(nn.Module):
    """Adversarial prior matching (original DIM): a discriminator tells ``G`` from N(0, 1).

    The discriminator minimises its binary cross-entropy; a gradient-reversal layer makes the
    encoder maximise it, pushing ``G`` towards the prior. Weight 0 in the seed's paper.
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.disc = projection(dim, hidden, 1)

    def forward(self, g: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``g``: ``(B, D)`` -> scalar loss."""
        prior = torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device)
        real = self.disc(prior)
        fake = self.disc(_GradReverse.apply(g))
        return F.binary_cross_entropy_with_logits(
            real, torch.ones_like(real)
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


class DIMProbes(nn.Module):
    """Detached diagnostic heads: they watch the representation and never train it.

    - composition probe: ``G`` -> mean site features of the crystal (label-free);
    - site probe: ``z_i`` -> the site's own elemental features (label-free);
    - property probe: ``G`` -> a scaled target, trained only on crystals whose label is given
      (never used for model selection).
    """

    def __init__(self, global_dim: int, local_dim: int, site_features: int) -> None:
        super().__init__()
        self.composition = nn.Linear(global_dim, site_features)
        self.site = nn.Linear(local_dim, site_features)
        self.property = projection(global_dim, 64, 1)

    def forward(
        self,
        out: EncoderOutput,
        site_features: Tensor,
        targets: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Probe losses (MSE) on detached inputs; ``targets`` is ``(B,)`` with NaN = unlabelled."""
        g = out.global_mu.detach()
        z = out.local_mu.detach()
        mask = out.site_mask
        comp = masked_mean(site_features, mask, dim=1)
        losses = {
            "probe_composition": F.mse_loss(self.composition(g), comp),
            "probe_site": masked_mean(
                (self.site(z) - site_features).pow(2).mean(-1), mask, dim=1
            ).mean(),
        }
        if targets is not None:
            known = torch.isfinite(targets)
            if known.any():
                pred = self.property(g).squeeze(-1)
                losses["probe_property"] = F.mse_loss(pred[known], targets[known])
                losses["probe_property_mae"] = (pred[known] - targets[known]).abs().mean().detach()
        return losses
