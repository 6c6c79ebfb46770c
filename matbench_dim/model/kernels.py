"""The compiled regions of the Site-Net encoder and of the local DIM critic.

Each kernel is a plain function over tensors, written for :func:`torch.compile` and called
through :func:`matbench_dim.model.fused.call_compiled` (which falls back to the same function
in eager mode where compiling is off or fails); the modules in :mod:`.sitenet` and :mod:`.dim`
decide when to use them (:func:`matbench_dim.model.fused.use_fused`).

- :func:`attention_core` (and :func:`attention_core_blocks`, its row-blocked caller): the
  per-pair part of an attention block;
- :func:`pair_embedding` (and :class:`PairEmbedding`, with a hand-written backward):
  ``LayerNorm(act(d w + b))`` of the distances;
- :func:`critic_scores`, :func:`critic_scores_grad` and :class:`CriticView`: one view of the
  local critic, with a backward pass that recomputes the rows instead of storing them.

Shapes: ``R`` rows (unique sites), ``S`` supercell-site columns, ``H`` hidden width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from matbench_dim.model import fused

_CORE_DYNAMIC = {0: (0,), 1: (0,), 2: (0, 1), 3: (0, 1), 4: (0, 1)}


def attention_core_blocks(
    neighbour_part: Tensor,
    site_part: Tensor,
    pair_part: Tensor,
    neighbour_index: Tensor,
    pair_mask: Tensor,
    *consts: Any,
) -> tuple[Tensor, Tensor] | None:
    """The compiled :func:`attention_core`, one block of rows at a time (None if unavailable).

    Rows are independent (each row's softmax runs over its own columns), so the rows are
    split into blocks whose ``(rows, S, 2 hidden)`` intermediates fit in cache
    (:func:`fused.row_blocks`): the kernel's several passes over them then read cache, not
    memory. ``split`` (not slicing) keeps the backward pass to one concatenation. ``consts``
    are :func:`attention_core`'s last arguments (``w_logits, b_logits, eps, activation``),
    the same for every block.
    """
    sizes = fused.row_blocks(pair_part.shape[0], pair_part[0].numel() * pair_part.element_size())
    blocks = zip(
        site_part.split(sizes),
        pair_part.split(sizes),
        neighbour_index.split(sizes),
        pair_mask.split(sizes),
        strict=True,
    )
    weights, pooled = [], []
    for sp, pp, idx, mask in blocks:
        args = (neighbour_part, sp, pp, idx, mask, *consts)
        out = fused.call_compiled("attention_core", attention_core, args, _CORE_DYNAMIC)
        if out is None:
            return None
        weights.append(out[0])
        pooled.append(out[1])
    if len(sizes) == 1:
        return weights[0], pooled[0]
    return torch.cat(weights), torch.cat(pooled)


def attention_core(
    neighbour_part: Tensor,
    site_part: Tensor,
    pair_part: Tensor,
    neighbour_index: Tensor,
    pair_mask: Tensor,
    w_logits: Tensor,
    b_logits: Tensor,
    eps: float,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """Per-pair part of an attention block, written for :func:`torch.compile`.

    ``hidden_ij = act(W_n h_j + W_c e_ij + W_s h_i)``, normalised (no affine) in two halves;
    logits from the first half (``w_logits``, ``b_logits``: the logits layer with the
    LayerNorm's affine map folded in), masked softmax over ``j``, and the attention-weighted
    sum of the second half. Returns ``weights (R, S, heads)`` and ``pooled (R, heads, hidden)``.
    """
    r, s = neighbour_index.shape
    a = pair_part.shape[-1] // 2
    hidden = F.embedding(neighbour_index, neighbour_part) + pair_part + site_part[:, None, :]
    hidden = fused.ACTIVATION_FNS[activation](hidden)
    normed = F.layer_norm(hidden.view(r, s, 2, a), (a,), eps=eps)
    logits = F.linear(normed[:, :, 0, :], w_logits, b_logits)
    weights = torch.softmax(logits.masked_fill(~pair_mask[..., None], float("-inf")), dim=1)
    pooled = torch.bmm(weights.transpose(1, 2), normed[:, :, 1, :])
    return weights, pooled


def pair_embedding(
    raw: Tensor,
    weight: Tensor,
    bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
    activation: str,
) -> Tensor:
    """``LayerNorm(act(raw * weight + bias))`` for a one-feature ``raw (R, S, 1)`` (compiled)."""
    x = fused.ACTIVATION_FNS[activation](raw * weight + bias)
    return F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)


def pair_embedding_grad(
    raw: Tensor,
    weight: Tensor,
    bias: Tensor,
    norm_weight: Tensor,
    grad: Tensor,
    eps: float,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """Backward kernel of :class:`PairEmbedding`: recomputes the forward pass per pair.

    With ``x = raw w + b``, ``h = act(x)``, ``n = (h - mean) rstd`` (over the last axis) and
    the output ``n gamma + beta``, returns ``grad_x (R, S, H)`` (the gradient at the
    activation's input) and ``grad * n (R, S, H)`` (summed over the pairs, gamma's gradient).
    The sums over pairs are left to the caller (ATen reduces across rows faster than the
    compiled loop does).
    """
    x = raw * weight + bias
    h, dh = fused.ACTIVATION_GRADS[activation](x)
    mean = h.mean(-1, keepdim=True)
    centred = h - mean
    rstd = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    normed = centred * rstd
    g_normed = grad * norm_weight
    g_h = rstd * (
        g_normed
        - g_normed.mean(-1, keepdim=True)
        - normed * (g_normed * normed).mean(-1, keepdim=True)
    )
    return g_h * dh, grad * normed


class PairEmbedding(torch.autograd.Function):
    """Compiled :func:`pair_embedding` with a hand-written backward pass.

    Inductor's own backward of the pair embedding reduced the parameter gradients over the
    ``R x S`` pairs in a slow loop (28 ms for a ``1200 x 40 x 64`` embedding on an AVX-512
    Xeon, five times the forward pass); here the per-pair part is one compiled kernel
    (:func:`pair_embedding_grad`, which recomputes the forward pass instead of storing it)
    and the sums over pairs are ATen reductions and a matrix-vector product.
    """

    @staticmethod
    def forward(
        ctx: Any,
        raw: Tensor,
        weight: Tensor,
        bias: Tensor,
        norm_weight: Tensor,
        norm_bias: Tensor,
        eps: float,
        activation: str,
    ) -> Tensor:
        args = (raw, weight, bias, norm_weight, norm_bias, eps, activation)
        out = fused.call_compiled("pair_embedding", pair_embedding, args, {0: (0, 1)})
        if out is None:
            out = pair_embedding(*args)
        ctx.eps, ctx.activation = eps, activation
        ctx.save_for_backward(raw, weight, bias, norm_weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        raw, weight, bias, norm_weight = ctx.saved_tensors
        args = (raw, weight, bias, norm_weight, grad.contiguous(), ctx.eps, ctx.activation)
        out = fused.call_compiled(
            "pair_embedding_grad", pair_embedding_grad, args, {0: (0, 1), 4: (0, 1)}
        )
        grad_x, grad_normed = out if out is not None else pair_embedding_grad(*args)
        width = grad_x.shape[-1]
        flat_x = grad_x.reshape(-1, width)
        grad_raw = (grad_x * weight).sum(-1, keepdim=True) if ctx.needs_input_grad[0] else None
        grad_weight = raw.reshape(1, -1) @ flat_x
        return (
            grad_raw,
            grad_weight.reshape(width),
            flat_x.sum(0),
            grad_normed.reshape(-1, width).sum(0),
            grad.reshape(-1, width).sum(0),
            None,
            None,
        )


def critic_scores(
    site_part: Tensor,
    index: Tensor,
    distances: Tensor,
    w_distance: Tensor,
    q: Tensor,
    c: Tensor,
    activation: str,
) -> Tensor:
    """Local critic scores of one view: ``(R, S)`` (the forward kernel of :class:`CriticView`).

    ``T_rs = <q_r, act(site_part[index_rs] + distances_rs w_distance)> + c_r``, with
    ``site_part = W_s s + b`` (the site part of ``g``'s first layer, per site) and
    ``q = W^T f(z)``, ``c = <f(z), b>`` (``g``'s last layer folded into the row side).
    """
    x = F.embedding(index, site_part) + distances[..., None] * w_distance
    return (fused.ACTIVATION_FNS[activation](x) * q[:, None, :]).sum(-1) + c


def critic_scores_grad(
    site_part: Tensor,
    index: Tensor,
    distances: Tensor,
    w_distance: Tensor,
    q: Tensor,
    grad: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward kernel of :class:`CriticView`: recomputes the rows instead of storing them.

    Returns ``(grad_x (R, S, H), grad_q (R, H), grad_w_distance (H,))``; ``grad_x`` is then
    scattered onto the sites.
    """
    x = F.embedding(index, site_part) + distances[..., None] * w_distance
    a, da = fused.ACTIVATION_GRADS[activation](x)
    g = grad[..., None]
    grad_x = g * q[:, None, :] * da
    grad_q = (g * a).sum(1)
    grad_w = (grad_x * distances[..., None]).sum((0, 1))
    return grad_x, grad_q, grad_w


_ROWS = {0: (0,), 1: (0, 1), 2: (0, 1), 4: (0,), 5: (0,)}
_ROWS_GRAD = {0: (0,), 1: (0, 1), 2: (0, 1), 4: (0,), 5: (0, 1)}


class CriticView(torch.autograd.Function):
    """Compiled :func:`critic_scores` that keeps no ``(R, S, H)`` tensor for backward."""

    @staticmethod
    def forward(
        ctx: Any,
        site_part: Tensor,
        index: Tensor,
        distances: Tensor,
        w_distance: Tensor,
        q: Tensor,
        c: Tensor,
        activation: str,
    ) -> Tensor:
        args = (site_part, index, distances, w_distance, q, c, activation)
        out = fused.call_compiled("critic_scores", critic_scores, args, _ROWS)
        if out is None:
            out = critic_scores(*args)
        ctx.activation = activation
        ctx.save_for_backward(site_part, index, distances, w_distance, q)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        site_part, index, distances, w_distance, q = ctx.saved_tensors
        grad = grad.contiguous()
        width = site_part.shape[-1]
        # one block of rows at a time, so that each block's (rows, S, H) gradient is still in
        # cache when it is scattered onto the sites; index_add_ rather than
        # embedding_dense_backward: the same sums, ~3x faster on CPU (benchmarks/README.md)
        sizes = fused.row_blocks(index.shape[0], index.shape[1] * width * site_part.element_size())
        grad_site = torch.zeros_like(site_part)
        grad_q, grad_w = [], []
        for idx, dist, qb, gb in zip(
            index.split(sizes),
            distances.split(sizes),
            q.split(sizes),
            grad.split(sizes),
            strict=True,
        ):
            args = (site_part, idx, dist, w_distance, qb, gb, ctx.activation)
            out = fused.call_compiled("critic_scores_grad", critic_scores_grad, args, _ROWS_GRAD)
            grad_x, gq, gw = out if out is not None else critic_scores_grad(*args)
            grad_site.index_add_(0, idx.reshape(-1), grad_x.reshape(-1, width))
            grad_q.append(gq)
            grad_w.append(gw)
        grad_q_all = grad_q[0] if len(grad_q) == 1 else torch.cat(grad_q)
        grad_w_all = grad_w[0] if len(grad_w) == 1 else torch.stack(grad_w).sum(0)
        grad_c = grad.sum(1, keepdim=True)
        return grad_site, None, None, grad_w_all, grad_q_all, grad_c, None
