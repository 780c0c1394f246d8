"""A heavy branch's outputs back at their positions, with the residual and the light branch, as one op.

Shapes: b batch, n sequence, d width, k picks. base [b, n, d] (the residual stream),
light [b, n, d] (the light branch) or None, routed [b, k, d] (the heavy branch's rows),
indices [b, k] (positions, unique within a row), weights [b, k] or None, real [b, k] bool or
None, null [d] or None:

    out = base + light + (null at every position no real pick covers)
    out[b, indices[b, j]] += weights[b, j] * routed[b, j]        for every real pick j

in base's dtype. Forward: one pass over [b, n, d] and one over the picks' rows (no collisions:
picks are unique within a row). Backward: the residual's and the light branch's gradient are
the output's (a cast at most), one pass over the picks' rows gives the heavy rows' and the
weights' gradients and the picks' share of null's, and a column sum gives the rest of null's.
Masked picks are selected away, never multiplied by 0: a NaN in a row that is not real reaches
no output and no gradient. Registered with torch.library; CUDA graphs capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import runtime
from .runtime import kernel_op, off_current_device, register_fake

BLOCK_ROWS = 16  # rows per program; a row of d <= 1024 stays in one block of BLOCK_D


@triton.jit
def _dense_kernel(base_ptr, light_ptr, null_ptr, out_ptr, rows, d,
                  HAS_LIGHT: tl.constexpr, HAS_NULL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    ok = (r[:, None] < rows) & (c[None, :] < d)
    offs = r[:, None].to(tl.int64) * d + c[None, :]
    acc = tl.load(base_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_LIGHT:
        acc += tl.load(light_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_NULL:
        acc += tl.load(null_ptr + c, mask=c < d, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _pick_rows(idx_ptr, real_ptr, w_ptr, s, n_picks, k, n, HAS_REAL: tl.constexpr, HAS_W: tl.constexpr):
    """Flat output rows of picks s (b * n + position), whether each is live, and its weight."""
    live = s < n_picks
    pos = tl.load(idx_ptr + s, mask=live, other=0)
    row = (s // k).to(tl.int64) * n + pos
    if HAS_REAL:
        live = live & (tl.load(real_ptr + s, mask=live, other=0) != 0)
    w = s.to(tl.float32) * 0.0 + 1.0
    if HAS_W:
        w = tl.load(w_ptr + s, mask=live, other=0.0).to(tl.float32)
    return row, live, w


@triton.jit
def _sparse_kernel(out_ptr, routed_ptr, idx_ptr, w_ptr, real_ptr, null_ptr, n_picks, k, n, d,
                   HAS_W: tl.constexpr, HAS_REAL: tl.constexpr, HAS_NULL: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    row, live, w = _pick_rows(idx_ptr, real_ptr, w_ptr, s, n_picks, k, n, HAS_REAL, HAS_W)
    ok = live[:, None] & (c[None, :] < d)
    h = tl.load(routed_ptr + s[:, None].to(tl.int64) * d + c[None, :], mask=ok, other=0.0).to(tl.float32)
    add = w[:, None] * h
    if HAS_NULL:
        add -= tl.load(null_ptr + c, mask=c < d, other=0.0).to(tl.float32)[None, :]
    o = out_ptr + row[:, None] * d + c[None, :]
    tl.store(o, (tl.load(o, mask=ok, other=0.0).to(tl.float32) + add).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sparse_bwd_kernel(g_ptr, routed_ptr, idx_ptr, w_ptr, real_ptr, d_routed_ptr, d_w_ptr, d_null_ptr,
                       n_picks, k, n, d,
                       HAS_W: tl.constexpr, HAS_REAL: tl.constexpr, HAS_NULL: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    s = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    row, live, w = _pick_rows(idx_ptr, real_ptr, w_ptr, s, n_picks, k, n, HAS_REAL, HAS_W)
    ok = live[:, None] & (c[None, :] < d)
    g = tl.load(g_ptr + row[:, None] * d + c[None, :], mask=ok, other=0.0).to(tl.float32)
    in_picks = (s[:, None] < n_picks) & (c[None, :] < d)
    tl.store(d_routed_ptr + s[:, None].to(tl.int64) * d + c[None, :],
             (w[:, None] * g).to(d_routed_ptr.dtype.element_ty), mask=in_picks)
    if HAS_W:
        h = tl.load(routed_ptr + s[:, None].to(tl.int64) * d + c[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(d_w_ptr + s, tl.sum(g * h, axis=1), mask=s < n_picks)
    if HAS_NULL:  # this program's share of -sum of g over the picks' rows
        tl.store(d_null_ptr + pid * d + c, -tl.sum(g, axis=0), mask=c < d)


def _grid_and_block(rows: int, d: int) -> tuple[tuple[int], int]:
    return (triton.cdiv(rows, BLOCK_ROWS),), triton.next_power_of_2(d)


def _flags(weights, real, null) -> dict:
    return dict(HAS_W=weights is not None, HAS_REAL=real is not None, HAS_NULL=null is not None)


@kernel_op("colt5::scatter_back")
def _scatter_op(base: Tensor, light: Tensor | None, routed: Tensor, indices: Tensor, weights: Tensor | None,
                real: Tensor | None, null: Tensor | None) -> Tensor:
    if off_current_device(base):
        with torch.cuda.device(base.device):
            return _scatter_op(base, light, routed, indices, weights, real, null)
    b, n, d = base.shape
    k = indices.shape[1]
    out = runtime.empty(base.shape, device=base.device, dtype=base.dtype)
    grid, block_d = _grid_and_block(b * n, d)
    light_arg = base if light is None else light.contiguous()
    null_arg = base if null is None else null.contiguous()
    _dense_kernel[grid](base.contiguous(), light_arg, null_arg, out, b * n, d, HAS_LIGHT=light is not None,
                        HAS_NULL=null is not None, BLOCK_R=BLOCK_ROWS, BLOCK_D=block_d)
    if b * k:
        grid, _ = _grid_and_block(b * k, d)
        _sparse_kernel[grid](out, routed.contiguous(), indices.contiguous(), base if weights is None else weights.contiguous(),
                             base if real is None else real.contiguous().view(torch.uint8), null_arg, b * k, k, n, d,
                             **_flags(weights, real, null), BLOCK_R=BLOCK_ROWS, BLOCK_D=block_d)
    return out


@register_fake(_scatter_op)
def _(base, light, routed, indices, weights, real, null):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@kernel_op("colt5::scatter_back_bwd")
def _scatter_bwd_op(g: Tensor, routed: Tensor, indices: Tensor, weights: Tensor | None, real: Tensor | None,
                    has_null: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (d_routed [b, k, d] in routed's dtype, d_weights [b, k] fp32, d_null [d] fp32); the last
    two empty when there are no weights / no null."""
    if off_current_device(g):
        with torch.cuda.device(g.device):
            return _scatter_bwd_op(g, routed, indices, weights, real, has_null)
    b, n, d = g.shape
    k = indices.shape[1]
    g = g.contiguous()
    d_routed = runtime.empty(routed.shape, device=g.device, dtype=routed.dtype)
    d_w = runtime.empty((b, k) if weights is not None else (0,), device=g.device, dtype=torch.float32)
    grid, block_d = _grid_and_block(b * k, d)
    partial = runtime.empty((grid[0], d) if has_null else (0,), device=g.device, dtype=torch.float32)
    if b * k:
        _sparse_bwd_kernel[grid](g, routed.contiguous(), indices.contiguous(), g if weights is None else weights.contiguous(),
                                 g if real is None else real.contiguous().view(torch.uint8), d_routed, d_w, partial,
                                 b * k, k, n, d, HAS_W=weights is not None, HAS_REAL=real is not None, HAS_NULL=has_null,
                                 BLOCK_R=BLOCK_ROWS, BLOCK_D=block_d)
    d_null = g.new_empty((0,), dtype=torch.float32)
    if has_null:
        d_null = g.float().sum((0, 1)) + partial.sum(0)
    return d_routed, d_w, d_null


@register_fake(_scatter_bwd_op)
def _(g, routed, indices, weights, real, has_null):
    b, n, d = g.shape
    k = indices.shape[1]
    return (torch.empty_like(routed, memory_format=torch.contiguous_format),
            g.new_empty((b, k) if weights is not None else (0,), dtype=torch.float32),
            g.new_empty((d,) if has_null else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    base, light, routed, indices, weights, real, null = inputs
    ctx.save_for_backward(routed, indices, weights, real)
    ctx.light_dtype = None if light is None else light.dtype
    ctx.null_dtype = None if null is None else null.dtype
    ctx.base_dtype = base.dtype


def _backward(ctx, g):
    routed, indices, weights, real = ctx.saved_tensors
    d_routed, d_w, d_null = _scatter_bwd_op(g, routed, indices, weights, real, ctx.null_dtype is not None)
    d_light = None if ctx.light_dtype is None else g.to(ctx.light_dtype)
    return (g, d_light, d_routed, None, d_w if weights is not None else None, None,
            d_null.to(ctx.null_dtype) if ctx.null_dtype is not None else None)


_scatter_op.register_autograd(_backward, setup_context=_setup_context)


def scatter_back_reference(base: Tensor, routed: Tensor, indices: Tensor | None, *, light: Tensor | None = None,
                           weights: Tensor | None = None, real: Tensor | None = None, null: Tensor | None = None) -> Tensor:
    """The specification in plain PyTorch; also routes [b, r, k] (they add up) and indices None
    (routed has base's positions; with a route dim the routes add up). null: one route only."""
    out = base if light is None else base + light.to(base.dtype)
    if real is not None:  # first: a NaN row must not reach the weights' gradient either
        routed = torch.where(real.unsqueeze(-1), routed, 0.0)
    if weights is not None:
        routed = routed * weights.unsqueeze(-1).to(routed.dtype)
    routed = routed.to(base.dtype)
    if null is not None:
        null = null.to(base.dtype)
        routed = routed - null if real is None else torch.where(real.unsqueeze(-1), routed - null, 0.0)
        out = out + null
    if indices is None:
        return out + (routed if routed.dim() == out.dim() else routed.sum(1))
    if indices.dim() == 2:
        indices, routed = indices.unsqueeze(1), routed.unsqueeze(1)
    b, n, d = out.shape
    offsets = torch.arange(b, device=out.device).mul_(n).view(b, 1)
    flat = out.reshape(b * n, d)
    for r in range(indices.shape[1]):
        flat = flat.index_add(0, (indices[:, r] + offsets).reshape(-1), routed[:, r].reshape(-1, d))
    return flat.view(b, n, d)


def scatter_back_triton(base: Tensor, routed: Tensor, indices: Tensor, *, light: Tensor | None = None,
                        weights: Tensor | None = None, real: Tensor | None = None, null: Tensor | None = None) -> Tensor:
    """The fused op for one route: indices [b, k] (see the module docstring)."""
    return _scatter_op(base, light, routed, indices, weights, real, null)
