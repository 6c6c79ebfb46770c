"""DIM losses against slow, obviously-correct reference implementations (loops over pairs)."""

from __future__ import annotations

import math

import pytest
import torch

from matbench_dim.model.dim import GaussianKL, GlobalDIMLoss, LocalDIMLoss
from matbench_dim.model.layout import PairInputs
from matbench_dim.model.negatives import PairView, distance_weights, rolled_rows


def softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def random_views(s=6, f=5, k=3, seed=0):
    """Rows of 3 crystals with 4, 2 and 3 unique sites; random pair rows and weights."""
    g = torch.Generator().manual_seed(seed)
    row_crystal = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    r = len(row_crystal)

    def view():
        d = torch.rand(r, s, generator=g) * 5
        valid = torch.rand(r, s, generator=g) > 0.3
        valid[:, 0] = True
        feats = torch.randn(r, s, f, generator=g)
        return PairView(feats, distance_weights(d, valid))

    z = torch.randn(r, 7, generator=g)
    return z, view(), [view() for _ in range(k)], row_crystal


def critic_score(loss, z_vec, u_vec):
    with torch.no_grad():
        return float(loss.f(z_vec[None])[0] @ loss.g(u_vec[None])[0])


def test_distance_weights_normalised_and_zero_on_invalid():
    d = torch.tensor([[[0.0, 1.0, 3.0]]])
    valid = torch.tensor([[[True, True, False]]])
    w = distance_weights(d, valid)
    assert w[0, 0, 2] == 0
    assert w.sum() == pytest.approx(1.0)
    assert w[0, 0, 0] / w[0, 0, 1] == pytest.approx(4.0)  # (0+1)^-2 / (1+1)^-2


@pytest.mark.parametrize("estimator", ["jsd", "infonce"])
def test_local_dim_loss_matches_reference(estimator):
    torch.manual_seed(0)
    z, pos, negs, row_crystal = random_views()
    loss = LocalDIMLoss(7, 5, critic_dim=8, critic_hidden=6, estimator=estimator)
    got = loss(z, pos, negs, row_crystal).loss.item()

    def t(i, view, j):
        return critic_score(loss, z[i], view.features[i, j])

    def pairs_of(view, i):
        return [j for j in range(view.weights.shape[1]) if float(view.weights[i, j]) > 0]

    per_row = []
    for i in range(z.shape[0]):
        if estimator == "jsd":
            val = sum(float(pos.weights[i, j]) * softplus(-t(i, pos, j)) for j in pairs_of(pos, i))
            val += sum(
                sum(float(v.weights[i, j]) * softplus(t(i, v, j)) for j in pairs_of(v, i))
                for v in negs
            ) / len(negs)
        else:
            scores = [
                sum(float(v.weights[i, j]) * t(i, v, j) for j in pairs_of(v, i))
                for v in [pos, *negs]
            ]
            m = max(scores)
            val = -(scores[0] - m - math.log(sum(math.exp(x - m) for x in scores)))
        per_row.append(val)
    crystals = sorted(set(row_crystal.tolist()))
    per_crystal = [
        sum(v for v, c in zip(per_row, row_crystal.tolist(), strict=True) if c == q)
        / row_crystal.tolist().count(q)
        for q in crystals
    ]
    ref = sum(per_crystal) / len(per_crystal)
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("estimator", ["jsd", "infonce"])
def test_global_dim_loss_matches_reference(estimator):
    torch.manual_seed(1)
    g_gen = torch.Generator().manual_seed(3)
    b, p = 3, 4
    site_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    gvec = torch.randn(b, 5, generator=g_gen)
    z = torch.randn(b, p, 7, generator=g_gen)
    false = [
        (torch.randn(b, p, 7, generator=g_gen), site_mask),
        (torch.randn(b, p, 7, generator=g_gen), site_mask.roll(1, 0)),
    ]
    loss = GlobalDIMLoss(5, 7, critic_dim=8, critic_hidden=6, estimator=estimator)
    got = loss(gvec, z, site_mask, false).loss.item()

    def T(gv, zv):
        with torch.no_grad():
            return float(loss.f(gv[None])[0] @ loss.g(zv[None])[0])

    if estimator == "jsd":
        pos = (
            sum(
                sum(softplus(-T(gvec[q], z[q, i])) for i in range(p) if site_mask[q, i])
                / int(site_mask[q].sum())
                for q in range(b)
            )
            / b
        )
        other = (
            sum(
                sum(
                    sum(softplus(T(gvec[o], z[q, i])) for o in range(b) if o != q) / (b - 1)
                    for i in range(p)
                    if site_mask[q, i]
                )
                / int(site_mask[q].sum())
                for q in range(b)
            )
            / b
        )
        fakes = []
        for zf, m in false:
            fakes.append(
                sum(
                    sum(softplus(T(gvec[q], zf[q, i])) for i in range(p) if m[q, i])
                    / int(m[q].sum())
                    for q in range(b)
                )
                / b
            )
        ref = pos + (other + sum(fakes)) / (1 + len(fakes))
    else:
        per_crystal = []
        for q in range(b):
            vals = []
            for i in range(p):
                if not site_mask[q, i]:
                    continue
                scores = [T(gvec[o], z[q, i]) for o in range(b)]
                scores += [T(gvec[q], zf[q, i]) for zf, m in false if m[q, i]]
                mx = max(scores)
                lse = mx + math.log(sum(math.exp(s - mx) for s in scores))
                vals.append(lse - scores[q])
            per_crystal.append(sum(vals) / len(vals))
        ref = sum(per_crystal) / b
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_gaussian_kl_matches_closed_form_and_is_zero_at_prior():
    kl = GaussianKL()
    mu = torch.zeros(4, 3)
    logvar = torch.zeros(4, 3)
    assert kl(mu, logvar).item() == pytest.approx(0.0)
    mu = torch.tensor([[1.0, -2.0]])
    logvar = torch.tensor([[0.5, -1.0]])
    ref = (
        sum(
            0.5 * (m**2 + math.exp(lv) - 1 - lv)
            for m, lv in zip(mu[0].tolist(), logvar[0].tolist(), strict=True)
        )
        / 2
    )
    assert kl(mu, logvar).item() == pytest.approx(ref, rel=1e-6)
    mask = torch.tensor([True, False])
    both = torch.stack([mu[0], torch.full((2,), 50.0)])
    assert kl(both, torch.stack([logvar[0], logvar[0]]), mask).item() == pytest.approx(
        ref, rel=1e-6
    )


def test_rolled_rows_come_from_another_crystal():
    n_sites = torch.tensor([3, 1, 2, 3])
    offsets = torch.cumsum(n_sites, 0) - n_sites
    row_crystal = torch.repeat_interleave(torch.arange(4), n_sites)
    row_site = torch.cat([torch.arange(int(k)) for k in n_sites])
    pairs = PairInputs(None, None, None, row_crystal, row_site, offsets, n_sites)
    src = rolled_rows(pairs, 2)
    assert row_crystal[src].tolist() == [((c + 2) % 4) for c in row_crystal.tolist()]
    assert (row_site[src] == row_site % n_sites[row_crystal[src]]).all()


def test_losses_reject_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        LocalDIMLoss(4, 4, estimator="mine")
