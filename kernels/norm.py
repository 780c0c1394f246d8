"""LayerNorm and the routers' scores in one op: what every routed layer does first.

Shapes: x [rows, d] (a [b, n, d] input flattened), weight and bias [d], routing tokens u [R, d]
(the routes of the layer's routers, stacked) -> xn [rows, d] in the compute dtype of the layer's
matmuls (bf16 under autocast), scores [b, R, n] fp32.

    xn_fp32 = (x - mean) / sqrt(var + eps) * weight + bias
    scores[b, r, i] = xn_fp32[b, i] . u[r]

A routed layer normalises its input once and scores every token for each of its routers; as
separate ops that is a norm, a cast to bf16, a score matmul reading an fp32 copy of xn, and in
the backward a norm backward, casts, two matmuls and the sum of the two gradients of xn. Here
the forward is one pass over x and the backward one pass plus a reduction of per-program
partial sums for the weight, bias and routing-token gradients. Scores are computed from the
fp32 normalised values: routing decisions hang on small differences that bf16 would round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import runtime
from .runtime import kernel_op, off_current_device, register_fake

BLOCK_ROWS = 16  # rows per program of the forward (d up to a few thousand stays in registers)
# The backward keeps more values per row live: 8 rows per program in 2 warps measured fastest on
# an H200 at 131k rows of 512 (263-359 us for 1-3 routes, against 352-482 with 16 rows in 4 warps
# and more with more warps: the sums over rows cross fewer warps).
BWD_BLOCK_ROWS, BWD_WARPS = 8, 2


@triton.jit
def _norm_rows(x_ptr, w_ptr, b_ptr, rows, d, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    ok = (r[:, None] < rows) & (c[None, :] < d)
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * d + c[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / d
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / d + eps)
    xhat = xc * rstd[:, None]
    w = tl.load(w_ptr + c, mask=c < d, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + c, mask=c < d, other=0.0).to(tl.float32)
    y = tl.where(ok, xhat * w[None, :] + bias[None, :], 0.0)
    return r, c, ok, xhat, y, mean, rstd, w


@triton.jit
def _norm_score_fwd_kernel(x_ptr, w_ptr, b_ptr, u_ptr, xn_ptr, s_ptr, mean_ptr, rstd_ptr, rows, n, d, eps,
                           R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    r, c, ok, xhat, y, mean, rstd, w = _norm_rows(x_ptr, w_ptr, b_ptr, rows, d, eps, BLOCK_M, BLOCK_D)
    tl.store(xn_ptr + r[:, None].to(tl.int64) * d + c[None, :], y.to(xn_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + r, mean, mask=r < rows)
    tl.store(rstd_ptr + r, rstd, mask=r < rows)
    # scores [b, R, n]: row r of x is (batch r // n, position r % n)
    s_row = (r // n).to(tl.int64) * R * n + r % n
    for k in tl.static_range(R):
        u = tl.load(u_ptr + k * d + c, mask=c < d, other=0.0).to(tl.float32)
        tl.store(s_ptr + s_row + k * n, tl.sum(y * u[None, :], axis=1), mask=r < rows)


@triton.jit
def _norm_score_bwd_kernel(x_ptr, w_ptr, b_ptr, u_ptr, mean_ptr, rstd_ptr, dxn_ptr, ds_ptr, dx_ptr, part_ptr,
                           rows, n, d, R: tl.constexpr, HAS_DXN: tl.constexpr, HAS_DS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    ok = (r[:, None] < rows) & (c[None, :] < d)
    offs = r[:, None].to(tl.int64) * d + c[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + r, mask=r < rows, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
    xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    w = tl.load(w_ptr + c, mask=c < d, other=0.0).to(tl.float32)
    # g = dL/dxn_fp32: the branches' gradient plus each route's score gradient times its token
    g = xhat * 0.0
    if HAS_DXN:
        g += tl.load(dxn_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    part = part_ptr + pid * (2 + R) * d
    if HAS_DS:
        bias = tl.load(b_ptr + c, mask=c < d, other=0.0).to(tl.float32)
        y = tl.where(ok, xhat * w[None, :] + bias[None, :], 0.0)
        s_row = (r // n).to(tl.int64) * R * n + r % n
        for k in tl.static_range(R):
            ds = tl.load(ds_ptr + s_row + k * n, mask=r < rows, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + k * d + c, mask=c < d, other=0.0).to(tl.float32)
            g += ds[:, None] * u[None, :]
            tl.store(part + (2 + k) * d + c, tl.sum(ds[:, None] * y, axis=0), mask=c < d)
    else:
        for k in tl.static_range(R):
            tl.store(part + (2 + k) * d + c, tl.zeros([BLOCK_D], tl.float32), mask=c < d)
    g = tl.where(ok, g, 0.0)
    tl.store(part + c, tl.sum(g * xhat, axis=0), mask=c < d)  # weight
    tl.store(part + d + c, tl.sum(g, axis=0), mask=c < d)  # bias
    gx = g * w[None, :]
    dx = rstd[:, None] * (gx - (tl.sum(gx, axis=1) / d)[:, None] - xhat * (tl.sum(gx * xhat, axis=1) / d)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _launch_shape(rows: int, d: int, block_rows: int = BLOCK_ROWS, warps: int = 4) -> tuple[tuple[int], int, int]:
    block_d = triton.next_power_of_2(d)
    num_warps = warps if block_d <= 1024 else 8
    return (triton.cdiv(rows, block_rows),), block_d, num_warps


@kernel_op("colt5::norm_score")
def _fwd_op(x: Tensor, weight: Tensor, bias: Tensor, tokens: Tensor, eps: float,
            out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (xn [b, n, d] out_dtype, scores [b, R, n] fp32, mean [b * n], rstd [b * n])."""
    if off_current_device(x):
        with torch.cuda.device(x.device):
            return _fwd_op(x, weight, bias, tokens, eps, out_dtype)
    b, n, d = x.shape
    R = tokens.shape[0]
    x = x.contiguous()
    xn = runtime.empty((b, n, d), device=x.device, dtype=out_dtype)
    scores = runtime.empty((b, R, n), device=x.device, dtype=torch.float32)
    mean = runtime.empty((b * n,), device=x.device, dtype=torch.float32)
    rstd = runtime.empty((b * n,), device=x.device, dtype=torch.float32)
    if b * n:
        grid, block_d, warps = _launch_shape(b * n, d)
        _norm_score_fwd_kernel[grid](x, weight.contiguous(), bias.contiguous(), tokens.contiguous(), xn, scores, mean, rstd,
                                     b * n, n, d, eps, R=R, BLOCK_M=BLOCK_ROWS, BLOCK_D=block_d, num_warps=warps)
    return xn, scores, mean, rstd


@register_fake(_fwd_op)
def _(x, weight, bias, tokens, eps, out_dtype):
    b, n, d = x.shape
    return (x.new_empty((b, n, d), dtype=out_dtype), x.new_empty((b, tokens.shape[0], n), dtype=torch.float32),
            x.new_empty((b * n,), dtype=torch.float32), x.new_empty((b * n,), dtype=torch.float32))


@kernel_op("colt5::norm_score_bwd")
def _bwd_op(dxn: Tensor | None, dscores: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor, tokens: Tensor,
            mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """-> (dx, [2 + R, d] fp32: the weight's, the bias's and the tokens' gradients)."""
    if off_current_device(x):
        with torch.cuda.device(x.device):
            return _bwd_op(dxn, dscores, x, weight, bias, tokens, mean, rstd)
    b, n, d = x.shape
    R = tokens.shape[0]
    x = x.contiguous()
    dx = runtime.empty(x.shape, device=x.device, dtype=x.dtype)
    grid, block_d, warps = _launch_shape(b * n, d, BWD_BLOCK_ROWS, BWD_WARPS)
    part = runtime.empty((grid[0], 2 + R, d), device=x.device, dtype=torch.float32)
    if b * n:
        _norm_score_bwd_kernel[grid](x, weight.contiguous(), bias.contiguous(), tokens.contiguous(), mean, rstd,
                                     x if dxn is None else dxn.contiguous(), x if dscores is None else dscores.contiguous(),
                                     dx, part, b * n, n, d, R=R, HAS_DXN=dxn is not None, HAS_DS=dscores is not None,
                                     BLOCK_M=BWD_BLOCK_ROWS, BLOCK_D=block_d, num_warps=warps)
    return dx, (part.sum(0) if b * n else part.new_zeros((2 + R, d)))


@register_fake(_bwd_op)
def _(dxn, dscores, x, weight, bias, tokens, mean, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((2 + tokens.shape[0], x.shape[-1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, tokens, _eps, _dtype = inputs
    ctx.save_for_backward(x, weight, bias, tokens, output[2], output[3])


def _backward(ctx, dxn, dscores, _dmean, _drstd):
    x, weight, bias, tokens, mean, rstd = ctx.saved_tensors
    dx, sums = _bwd_op(dxn, dscores, x, weight, bias, tokens, mean, rstd)
    return dx, sums[0].to(weight.dtype), sums[1].to(bias.dtype), sums[2:].to(tokens.dtype), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def norm_score_reference(x: Tensor, weight: Tensor, bias: Tensor, tokens: Tensor, eps: float,
                         out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The specification in plain PyTorch (float64 inputs stay float64)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        xn = torch.nn.functional.layer_norm(x.to(dtype), (x.shape[-1],), weight.to(dtype), bias.to(dtype), eps)
        scores = torch.einsum("bnd,rd->brn", xn, tokens.to(dtype))
    return xn.to(out_dtype), scores


def norm_score(x: Tensor, weight: Tensor, bias: Tensor, tokens: Tensor, *, eps: float = 1e-5,
               out_dtype: torch.dtype | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """LayerNorm of x [b, n, d] (weight, bias [d]) and the scores of its rows against the routing
    tokens [R, d]: returns (xn [b, n, d] in out_dtype (default x's), scores [b, R, n] fp32).

    backend None: the fused op on CUDA (d <= 8192), the reference otherwise; "triton" (CPU under
    TRITON_INTERPRET=1) or "reference" forces one.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    use_triton = backend == "triton" or (backend is None and x.is_cuda and x.shape[-1] <= 8192)
    if not use_triton:
        return norm_score_reference(x, weight, bias, tokens, eps, out_dtype)
    xn, scores, _, _ = _fwd_op(x, weight, bias, tokens, float(eps), out_dtype)
    return xn, scores
