"""The optimised DIM step equals the frozen reference implementation (losses and gradients).

``benchmarks/reference_dim_step.py`` holds a literal copy of the encoder and critic internals
as they were before the speed work (per-pair values, materialised pair rows, three full
local passes for the engineered negatives, ATen's mish); ``reference_internals()`` swaps it
in, so both run on the same modules, parameters, batches and random draws. Compared:

- float64, several configurations (estimators, heads, blocks, Coulomb term, distance
  expansion, with/without engineered negatives): the algebra, to ~1e-10;
- float32, the seed configuration, with the compiled kernels forced on
  (``MATBENCH_DIM_COMPILE=1``): the fast path, to float32 tolerance.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from matbench_dim.features.featurize import batch_indices, collate, featurize
from matbench_dim.model import fused
from matbench_dim.model.dim import DIMConfig, DIMObjective
from matbench_dim.model.layout import pair_inputs, to_rows
from matbench_dim.model.negatives import local_views
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from reference_dim_step import reference_internals, reference_local_views


@pytest.fixture(scope="module")
def batches(jdft2d_df):
    """Two fixed batches of real 2D crystals (mixed sizes, so rows and columns are padded)."""
    records = featurize(list(jdft2d_df["structure"].iloc[:80]), progress=False)
    groups = batch_indices([r.n_prim for r in records], 150, shuffle=True, seed=3)
    groups = [g for g in groups if len(g) > 2][:2]
    return [collate(records, g) for g in groups]


def _cast(batch, dtype):
    return dataclasses.replace(
        batch,
        **{
            f.name: getattr(batch, f.name).to(dtype)
            for f in dataclasses.fields(batch)
            if getattr(batch, f.name).is_floating_point()
        },
    )


def _step(encoder, objective, batch, seed):
    params = list(encoder.named_parameters()) + [
        (f"objective.{n}", p) for n, p in objective.named_parameters()
    ]
    for _, p in params:
        p.grad = None
    out = objective(encoder, batch, torch.Generator().manual_seed(seed))
    out["loss"].backward()
    grads = {n: p.grad.clone() if p.grad is not None else None for n, p in params}
    return {k: v.detach().clone() for k, v in out.items()}, grads


def _compare(encoder, objective, batch, seed, loss_tol, grad_rtol):
    new_out, new_grads = _step(encoder, objective, batch, seed)
    with reference_internals():
        ref_out, ref_grads = _step(encoder, objective, batch, seed)
    # the new step also logs the critics' accuracy per negative type (monitors added after
    # the reference was frozen): every reference value must be there and equal
    assert set(new_out) >= set(ref_out)
    for k in ref_out:
        torch.testing.assert_close(new_out[k], ref_out[k], rtol=loss_tol, atol=loss_tol, msg=k)
    assert set(new_grads) == set(ref_grads)
    # gradients that are zero in exact arithmetic (softmax shifts) are rounding noise: the
    # absolute tolerance scales with the largest gradient of the model
    scale = max(g.abs().max().item() for g in ref_grads.values() if g is not None)
    for name, ref in ref_grads.items():
        new = new_grads[name]
        assert (new is None) == (ref is None), name
        if ref is None:
            continue
        torch.testing.assert_close(new, ref, rtol=grad_rtol, atol=grad_rtol * scale, msg=name)


CONFIGS = [
    pytest.param({}, {}, id="seed-jsd"),
    pytest.param({}, {"estimator": "infonce"}, id="seed-infonce"),
    pytest.param({"heads": 2, "blocks": 2}, {}, id="heads2-blocks2"),
    pytest.param({"coulomb": True, "distance_expansion": 6}, {}, id="coulomb-rbf"),
    pytest.param({"activation": "silu"}, {"extra_false_samples": False}, id="silu-no-extra"),
]


@pytest.mark.parametrize(("enc_kw", "dim_kw"), CONFIGS)
def test_step_equals_reference_in_float64(batches, enc_kw, dim_kw):
    small = {"site_dim": 16, "pair_dim": 16, "attention_hidden": 16, "local_dim": 8}
    cfg = EncoderConfig(**{**small, "global_hidden": 16, "global_dim": 8, **enc_kw})
    torch.manual_seed(0)
    encoder = SiteNetEncoder(cfg).double()
    objective = DIMObjective(DIMConfig(critic_dim=16, critic_hidden=16, **dim_kw), cfg).double()
    for k, batch in enumerate(batches):
        _compare(encoder, objective, _cast(batch, torch.float64), k, 1e-10, 1e-8)


@pytest.mark.parametrize("block_bytes", [fused.ROW_BLOCK_BYTES, 20_000])
def test_step_equals_reference_in_float32_with_compiled_kernels(batches, monkeypatch, block_bytes):
    """Compiled kernels on; with 20 kB row blocks the attention runs in several blocks."""
    monkeypatch.setenv(fused.COMPILE_ENV, "1")
    monkeypatch.setattr(fused, "ROW_BLOCK_BYTES", block_bytes)
    blocks = []
    real_row_blocks = fused.row_blocks
    monkeypatch.setattr(
        fused, "row_blocks", lambda *a, **k: blocks.append(real_row_blocks(*a, **k)) or blocks[-1]
    )
    cfg = EncoderConfig()  # the seed's widths and mish
    torch.manual_seed(0)
    encoder = SiteNetEncoder(cfg)
    objective = DIMObjective(DIMConfig(), cfg)
    for k, batch in enumerate(batches):
        _compare(encoder, objective, batch, k, 2e-5, 2e-3)
    assert not fused._STATE["failed"], "compiled kernels were not used"
    assert blocks, "the row-blocked attention was not used"
    assert max(len(b) for b in blocks) > (1 if block_bytes < fused.ROW_BLOCK_BYTES else 0)


def test_row_blocks_cover_the_rows_in_near_equal_blocks():
    for n, row_bytes, block in [
        (1200, 20480, 4 << 20),
        (7, 100, 10),
        (1000, 1, 10**9),
        (50, 4096, 1),
    ]:
        sizes = fused.row_blocks(n, row_bytes, block)
        assert sum(sizes) == n
        assert max(sizes) - min(sizes) <= 1
        assert min(sizes) >= min(n, fused.MIN_BLOCK_ROWS // 2)
        assert len(sizes) == max(1, -(-n // max(fused.MIN_BLOCK_ROWS, block // row_bytes)))


def test_fused_mish_matches_aten(monkeypatch):
    monkeypatch.setenv(fused.COMPILE_ENV, "1")
    x = torch.cat([torch.linspace(-60, 60, 4001), torch.tensor([0.0, -1e-30, 25.0, -25.0])])
    x = x.reshape(-1, 5).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    fused.mish(x).backward(g)
    torch.nn.functional.mish(ref).backward(g)
    torch.testing.assert_close(fused.mish(x), torch.nn.functional.mish(ref), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, ref.grad, rtol=2e-5, atol=1e-6)


def test_row_views_materialise_to_the_reference_rows(batches):
    batch = batches[0]
    pairs = pair_inputs(batch)
    site_rows = to_rows(batch.site_features, batch.prim_mask)
    pos, negs = local_views(site_rows, pairs, True)
    ref_pos, ref_negs = reference_local_views(site_rows, pairs, True)
    for new, ref in zip([pos, *negs], [ref_pos, *ref_negs], strict=True):
        torch.testing.assert_close(new.features, ref.features, rtol=0, atol=0)
        torch.testing.assert_close(new.weights, ref.weights, rtol=0, atol=0)


def test_fast_mish_forms_keep_the_values():
    """``min(e^x, e^20)`` (the fast form) gives the mish of ``e^min(x, 20)`` to the bit, and
    the one-division derivative is as close to float64 autograd as the two-division one."""
    x = torch.cat(
        [
            torch.linspace(-200, 200, 400_001),
            torch.tensor([19.999998, 20.0, 20.000002, 88.7, 89.0, float("inf"), -float("inf")]),
        ]
    )
    e = torch.exp(torch.clamp(x, max=20.0))  # the forms as written before
    n = e * (e + 2.0)
    inv = 1.0 / (n + 2.0)
    t = n * inv
    two_divisions = t + x * (2.0 * (1.0 + t) * inv) * (e / (1.0 + e))
    for new, old in [
        (fused.mish_reference(x), x * (n / (n + 2.0))),
        (fused.mish_and_grad(x)[0], x * t),
    ]:
        torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)
    finite = x.isfinite()
    xd = x[finite].double().requires_grad_()
    (exact,) = torch.autograd.grad(torch.nn.functional.mish(xd).sum(), xd)
    err_new = (fused.mish_and_grad(x)[1][finite].double() - exact).abs().max()
    err_old = (two_divisions[finite].double() - exact).abs().max()
    assert err_new < 1e-6, err_new
    assert err_new <= 1.5 * err_old, (err_new, err_old)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        fused.mish_grad_reference(x, g),
        g * fused.mish_and_grad(x)[1],
        rtol=0,
        atol=0,
        equal_nan=True,
    )


@pytest.mark.parametrize("raw_grad", [False, True])
def test_pair_embedding_backward_matches_autograd(monkeypatch, raw_grad):
    from matbench_dim.model import kernels

    monkeypatch.setenv(fused.COMPILE_ENV, "1")
    gen = torch.Generator().manual_seed(0)
    raw = (torch.rand(30, 7, 1, generator=gen) * 8).requires_grad_(raw_grad)
    params = [torch.randn(16, generator=gen).requires_grad_() for _ in range(4)]
    grad = torch.randn(30, 7, 16, generator=gen)
    out = kernels.PairEmbedding.apply(raw, *params, 1e-5, "mish")
    new = torch.autograd.grad(out, [raw, *params] if raw_grad else params, grad)
    ref_out = kernels.pair_embedding(raw, *params, 1e-5, "mish")
    ref = torch.autograd.grad(ref_out, [raw, *params] if raw_grad else params, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(new, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not fused._STATE["failed"], "compiled kernels were not used"


@pytest.mark.parametrize("n_crystals", [6, 7])
def test_engineered_negatives_share_a_pass_only_when_the_batch_is_even(jdft2d_df, n_crystals):
    """Negatives 1 and 2 are one pass for an even batch, two for an odd one; same numbers."""
    from matbench_dim.model.layout import to_padded
    from matbench_dim.model.negatives import engineered_false_locals, roll_shift, rolled_rows

    records = featurize(list(jdft2d_df["structure"].iloc[:n_crystals]), progress=False)
    batch = collate(records, list(range(n_crystals)))
    cfg = EncoderConfig(site_dim=16, pair_dim=16, attention_hidden=16, local_dim=8)
    torch.manual_seed(0)
    encoder = SiteNetEncoder(cfg)
    pairs = pair_inputs(batch)
    calls = []
    real_forward = encoder.local.forward
    encoder.local.forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
    out = engineered_false_locals(encoder, batch, pairs, torch.Generator().manual_seed(0))
    assert len(calls) == (2 if n_crystals % 2 == 0 else 3)
    # negative 2, literally: b's species on the geometry of r = b + shift, paired with G_b
    mask = batch.prim_mask
    shift = roll_shift(n_crystals)
    src = rolled_rows(pairs, -shift)
    site_rows = to_rows(batch.site_features, mask)
    z_rows = to_rows(batch.atomic_numbers, mask)
    with torch.no_grad():
        mu, _ = real_forward(
            site_rows[src], pairs.neighbour_index, pairs.distances, pairs.pair_mask, z_rows[src]
        )
    rolled = (torch.arange(n_crystals) + shift) % n_crystals
    torch.testing.assert_close(out[1][0], to_padded(mu, mask)[rolled], rtol=1e-6, atol=1e-6)
    assert torch.equal(out[1][1], mask[rolled])


def test_engineered_negatives_keep_three_passes_with_dropout_in_training(jdft2d_df):
    """Dropout draws a mask per pass: negative 2 must get its own draw, even batch or not."""
    from matbench_dim.model.negatives import engineered_false_locals

    records = featurize(list(jdft2d_df["structure"].iloc[:6]), progress=False)
    batch = collate(records, list(range(6)))
    cfg = EncoderConfig(site_dim=16, pair_dim=16, attention_hidden=16, local_dim=8, dropout=0.1)
    encoder = SiteNetEncoder(cfg).train()
    calls = []
    real_forward = encoder.local.forward
    encoder.local.forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
    engineered_false_locals(encoder, batch, pair_inputs(batch), torch.Generator().manual_seed(0))
    assert len(calls) == 3
    encoder.eval()
    calls.clear()
    engineered_false_locals(encoder, batch, pair_inputs(batch), torch.Generator().manual_seed(0))
    assert len(calls) == 2
