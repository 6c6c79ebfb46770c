"""What each DIM stage is fed in pretraining (docs/dim-stage-inputs.md).

The seed's code builds the reparametrised local sample ``z + sigma * eps`` only for the local
critic; the global encoder, the global critic and the engineered false locals all see the
detached local *means*. Feeding the samples to the global stage instead lets its critic learn
"noisy vs clean" (the engineered negatives are means) rather than "own crystal vs another".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_settings import SMALL_DIM, SMALL_ENCODER

from matbench_dim.features.featurize import collate, featurize
from matbench_dim.model.dim import DIMObjective, GlobalDIMLoss, LocalDIMLoss
from matbench_dim.model.sitenet import GlobalEncoder, SiteNetEncoder
from matbench_dim.training.common import OptimizerConfig, split_train_val
from matbench_dim.training.pretrain import PretrainConfig, pretrain_dim

SMALL, DIM = SMALL_ENCODER, SMALL_DIM


@pytest.fixture(scope="module")
def flla_records(flla_sample_task):
    return featurize(list(flla_sample_task.structures), progress=False)


def _spy(monkeypatch, cls, calls):
    original = cls.forward

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)


def test_global_stage_is_fed_detached_local_means(flla_records, monkeypatch):
    """Positives and engineered negatives of the global stage are means; the local critic
    keeps the sample. A huge local variance makes any sample unmistakable."""
    torch.manual_seed(0)
    encoder = SiteNetEncoder(SMALL)
    objective = DIMObjective(DIM, SMALL)
    with torch.no_grad():  # sigma = e^4 ~ 55, far above the spread of the means
        encoder.local.logvar.weight.zero_()
        encoder.local.logvar.bias.fill_(8.0)
    batch = collate(flla_records, range(12))
    with torch.no_grad():
        ref = encoder(batch)  # means, no sampling
    mask = ref.site_mask
    scale = float(ref.local_mu[mask].abs().max())
    assert scale < 20  # the means are O(1); a sample's noise is ~55 per coordinate

    global_calls, local_calls, pool_calls = [], [], []
    _spy(monkeypatch, GlobalDIMLoss, global_calls)
    _spy(monkeypatch, LocalDIMLoss, local_calls)
    _spy(monkeypatch, GlobalEncoder, pool_calls)
    objective(encoder, batch, torch.Generator().manual_seed(1))

    # the global encoder pools the detached means
    (pooled, pool_mask), _ = pool_calls[0]
    assert not pooled.requires_grad
    torch.testing.assert_close(pooled, ref.local_mu, rtol=0, atol=0)
    torch.testing.assert_close(pool_mask, mask, rtol=0, atol=0)
    # the global critic's positives: the same detached means
    (g, z, site_mask, false_locals), _ = global_calls[0]
    assert g.shape[0] == z.shape[0]
    torch.testing.assert_close(site_mask, mask, rtol=0, atol=0)
    assert not z.requires_grad
    torch.testing.assert_close(z, ref.local_mu, rtol=0, atol=0)
    # its engineered negatives: means of corrupted crystals (three kinds), no gradient
    assert len(false_locals) == 3
    for zf, mf in false_locals:
        assert not zf.requires_grad
        assert zf.shape == z.shape
        assert float(zf[mf].abs().max()) < 20
    # the local critic scores the reparametrised sample
    (z_local, *_), _ = local_calls[0]
    assert float((z_local.detach() - ref.local_mu[mask]).abs().max()) > 100


def _global_critic_on_means(result, records, val_idx):
    """Fraction of (own G, own local mean) pairs scored positive, and of pairs where the own
    crystal's G outscores another crystal's G (the real task of the global critic)."""
    encoder, critic = result.encoder.eval(), result.objective.global_loss.eval()
    with torch.no_grad():
        out = encoder(collate(records, val_idx))
        scores = torch.einsum("bc,qpc->bqp", critic.f(out.global_mu), critic.g(out.local_mu))
        mask = out.site_mask
        own = scores.diagonal(dim1=0, dim2=1).transpose(0, 1)  # (B, P): T(G_q, z_qp)
        n = scores.shape[0]
        others = ~torch.eye(n, dtype=torch.bool)[:, :, None]
        beats = ((own[None] > scores) & others).sum(0).float() / (n - 1)
    return float((own > 0)[mask].float().mean()), float(beats[mask].mean())


def test_global_critic_scores_own_clean_means_as_positive(flla_records):
    """After a short pretraining, true (G, own local means) pairs score positive more often
    than not. With the samples fed to the global stage (the old wiring) the critic learns to
    call every clean mean a negative: 0.000 of the pairs positive, and own G beats another
    crystal's G on only 0.57-0.68 of the pairs (seeds 0-2), against 0.68-0.91 and 0.84-0.88
    with the means."""
    res = pretrain_dim(
        flla_records,
        encoder_cfg=SMALL,
        dim_cfg=DIM,
        optimizer_cfg=OptimizerConfig(lr=1e-3),
        cfg=PretrainConfig(epochs=8, batch_sites=300, val_fraction=0.2, patience=0),
        seed=0,
    )
    _, val_idx = split_train_val(len(flla_records), 0.2, 0)
    positive, own_beats_other = _global_critic_on_means(res, flla_records, val_idx)
    assert positive > 0.5, positive
    assert own_beats_other > 0.75, own_beats_other
    assert np.isfinite(res.history[-1]["val_dim_loss"])
