"""Hard top-k positions of each row: a Triton radix select, the reference, the public op.

Shapes: s and mask are [rows, n] inside (the public function flattens [..., n]); the output is
[rows, k] int64.

Routers pick their k tokens per row with this instead of `torch.topk`: on an H100 topk of one
row took ~50 us at n = 8192 (a single-block radix select) plus ~20 us to sort its output, and
a router needs neither the values nor an order.

Each score becomes a uint32 key whose unsigned order is the float order (-0.0 reads as +0.0;
NaN, masked and -inf positions share the lowest valid key). The k-th largest key T is found
bit by bit, most significant first: T | bit stays when at least k keys are >= it (32 counting
passes over a row held in registers, or streamed when it is longer). Then every key > T is
picked, and keys == T by ascending position until k are picked; positions are written in
ascending order.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import check_backend, check_mask, check_scores
from . import runtime
from .runtime import INTERPRET, kernel_op, off_current_device, register_fake

# Largest row a program keeps in registers (uint32 keys); longer rows are streamed per pass.
MAX_REG_BLOCK = 32768


@triton.jit
def _keys(s_row, mask_row, offs, n, HAS_MASK: tl.constexpr):
    """uint32 keys of a chunk: unsigned order = float order; past-the-end positions get 0,
    below every real key (the key of -inf is 0x007fffff)."""
    inb = offs < n
    s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
    ok = s == s
    if HAS_MASK:
        ok = ok & (tl.load(mask_row + offs, mask=inb, other=0) != 0)
    s = tl.where(ok, s, float("-inf"))
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0: equal floats, equal keys
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, ~bits, bits ^ -2147483648).to(tl.uint32, bitcast=True)
    return tl.where(inb, key, 0)


@triton.jit
def _store_picks(out_row, w_row, real_row, s_row, mask_row, pos, slot, picked, a_T, c_T,
                 HAS_MASK: tl.constexpr, PICK_WEIGHTS: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr):
    """Write the picked positions at their slots and, for a router, the soft top-k weight
    exp(min(s + a_T, 0) / e_T) there (1 with straight-through; 0 where the position does not
    take part) and whether the pick is a real token (unmasked)."""
    tl.store(out_row + slot, pos.to(tl.int64), mask=picked)
    if PICK_WEIGHTS:
        real = pos >= 0
        if HAS_MASK:
            real = tl.load(mask_row + pos, mask=picked, other=0) != 0
            tl.store(real_row + slot, real.to(tl.int8), mask=picked)
        if STRAIGHT_THROUGH:
            w = pos.to(tl.float32) * 0.0 + 1.0
        else:
            sc = tl.load(s_row + pos, mask=picked, other=float("-inf")).to(tl.float32)
            w = tl.where(real & (sc == sc), tl.exp2(tl.minimum(sc + a_T, 0.0) * c_T), 0.0)
        tl.store(w_row + slot, w, mask=picked)


@triton.jit
def _top_k_indices_kernel(
    s_ptr, mask_ptr, out_ptr, w_ptr, real_ptr, stats_ptr, n, k, mask_div, n_stat,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, IN_REGS: tl.constexpr,
    PICK_WEIGHTS: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
):
    # IN_REGS: the row fits one BLOCK_N chunk and stays in registers; otherwise every pass streams it.
    # PICK_WEIGHTS (routers): also the weights and real flags at the picks, from the soft
    # top-k's final offset and epsilon in stats [rows, 5, n_stat] (see kernels/soft_topk_kernels.py).
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * n
    mask_row = mask_ptr + (row // mask_div) * n  # a mask row may serve mask_div score rows
    out_row = out_ptr + row * k
    w_row = w_ptr + row * k
    real_row = real_ptr + row * k
    offs = tl.arange(0, BLOCK_N)
    a_T = 0.0
    c_T = 0.0
    if PICK_WEIGHTS:
        if not STRAIGHT_THROUGH:
            a_T = tl.load(stats_ptr + row * 5 * n_stat + n_stat - 1)  # _STAT_A = 0
            c_T = 1.4426950408889634 / tl.load(stats_ptr + row * 5 * n_stat + 2 * n_stat + n_stat - 1)  # _STAT_E = 2
    if IN_REGS:
        key = _keys(s_row, mask_row, offs, n, HAS_MASK)

    # T = the k-th largest key: the largest value with count(key >= T) >= k.
    t = (k * 0).to(tl.int64)
    for i in range(32):
        cand = (t | (1 << (31 - i))).to(tl.uint32)
        if IN_REGS:
            count = tl.sum((key >= cand).to(tl.int32), axis=0)
        else:
            count = k * 0
            for off in range(0, n, BLOCK_N):
                count += tl.sum((_keys(s_row, mask_row, off + offs, n, HAS_MASK) >= cand).to(tl.int32), axis=0)
        if count >= k:
            t = t | (1 << (31 - i))
    t = t.to(tl.uint32)

    # Keys > T all fit (fewer than k of them); ties at T fill the rest by position.
    if IN_REGS:
        need = k - tl.sum((key > t).to(tl.int32), axis=0)
        tie_rank = tl.cumsum((key == t).to(tl.int32), axis=0)
        picked = (key > t) | ((key == t) & (tie_rank <= need))
        slot = tl.cumsum(picked.to(tl.int32), axis=0) - 1
        _store_picks(out_row, w_row, real_row, s_row, mask_row, offs, slot, picked, a_T, c_T,
                     HAS_MASK, PICK_WEIGHTS, STRAIGHT_THROUGH)
    else:
        n_greater = k * 0
        for off in range(0, n, BLOCK_N):
            n_greater += tl.sum((_keys(s_row, mask_row, off + offs, n, HAS_MASK) > t).to(tl.int32), axis=0)
        need = k - n_greater
        ties_before = k * 0
        picked_before = k * 0
        for off in range(0, n, BLOCK_N):
            key_c = _keys(s_row, mask_row, off + offs, n, HAS_MASK)
            tie = key_c == t
            tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), axis=0)
            picked = (key_c > t) | (tie & (tie_rank <= need))
            slot = picked_before + tl.cumsum(picked.to(tl.int32), axis=0) - 1
            _store_picks(out_row, w_row, real_row, s_row, mask_row, off + offs, slot, picked, a_T, c_T,
                         HAS_MASK, PICK_WEIGHTS, STRAIGHT_THROUGH)
            ties_before += tl.sum(tie.to(tl.int32), axis=0)
            picked_before += tl.sum(picked.to(tl.int32), axis=0)


def _launch_select(s: Tensor, mask: Tensor | None, k: int, out: Tensor, *, mask_div: int = 1, weights: Tensor | None = None,
                   real: Tensor | None = None, stats: Tensor | None = None, straight_through: bool = False,
                   block_n: int | None = None) -> None:
    rows, n = s.shape
    if rows == 0:
        return
    block_n = block_n or min(MAX_REG_BLOCK, 1 << (n - 1).bit_length())  # next power of 2
    # warps: <= 64 keys per thread; the two cumsums over a 32768-row need the 16 warps
    num_warps = 4 if block_n <= 2048 else (8 if block_n <= 8192 else 16)
    mask_arg = mask.contiguous().view(torch.uint8) if mask is not None else s
    pick_weights = weights is not None
    _top_k_indices_kernel[(rows,)](
        s, mask_arg, out, weights if pick_weights else out, real if real is not None else out,
        stats if stats is not None else s, n, k, mask_div, 1 if stats is None else stats.shape[-1],
        HAS_MASK=mask is not None, BLOCK_N=block_n, IN_REGS=block_n >= n,
        PICK_WEIGHTS=pick_weights, STRAIGHT_THROUGH=straight_through, num_warps=num_warps,
    )


def top_k_indices_triton(s: Tensor, mask: Tensor | None, k: int, *, block_n: int | None = None) -> Tensor:
    """[rows, n] -> [rows, k] int64 on the Triton kernel (no argument checks). block_n: the chunk
    a pass reads (a power of 2; default the row's, up to MAX_REG_BLOCK): below n the row streams."""
    if off_current_device(s):  # Triton launches on the current device
        with torch.cuda.device(s.device):
            return top_k_indices_triton(s, mask, k, block_n=block_n)
    s = s.contiguous()
    out = runtime.empty((s.shape[0], k), device=s.device, dtype=torch.int64)
    _launch_select(s, mask, k, out, block_n=block_n)
    return out


def route_picks_triton(s: Tensor, mask: Tensor | None, k: int, stats: Tensor, *, mask_div: int,
                       straight_through: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A router's picks of s [rows, n] in one launch: (indices [rows, k] int64, weights [rows, k]
    fp32 at the picks (1 with straight-through), real [rows, k] bool (a copy of ones without a
    mask)). stats: the soft top-k's statistics of these rows."""
    s = s.contiguous()
    rows = s.shape[0]
    out = runtime.empty((rows, k), dtype=torch.int64, device=s.device)
    weights = runtime.empty((rows, k), dtype=torch.float32, device=s.device)
    real = torch.ones((rows, k), device=s.device, dtype=torch.bool)  # written by the kernel only with a mask
    _launch_select(s, mask, k, out, mask_div=mask_div, weights=weights, real=real.view(torch.int8), stats=stats,
                   straight_through=straight_through)
    return out, weights, real


def top_k_indices_reference(s: Tensor, mask: Tensor | None, k: int) -> Tensor:
    """The specification: the k largest (score desc, position asc), NaN/masked lowest, in
    ascending position order."""
    key = s.detach().float().masked_fill(s.isnan(), float("-inf"))
    if mask is not None:
        key = key.masked_fill(~mask, float("-inf"))
    order = key.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


@kernel_op("colt5::top_k_indices")
def _top_k_op(s: Tensor, mask: Tensor | None, k: int) -> Tensor:
    return top_k_indices_triton(s, mask, k)


@register_fake(_top_k_op)
def _(s, mask, k):
    return s.new_empty((s.shape[0], k), dtype=torch.int64)


def top_k_indices(s: Tensor, k: int, *, mask: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Positions of the k largest scores of each row of s [..., n] -> [..., k] int64.

    Ties go to the lower position; NaN and masked-out (mask False) positions rank below every
    other score (they are picked only when fewer than k others exist, lowest positions first).
    Positions come out in ascending order, not by score. No gradient (the indices are integers).

    backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "reference" (`torch.sort`), or
    None: Triton for CUDA tensors, the reference otherwise.

    Raises TypeError / ValueError naming the argument: s not floating, k not an int in [1, n],
    mask not bool of s's shape, an unknown backend.
    """
    check_scores(s)
    check_mask(mask, s)
    n = s.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    check_backend(backend)
    lead = s.shape[:-1]
    s2 = s.detach().reshape(-1, n)
    mask2 = None if mask is None else mask.reshape(-1, n)
    if backend == "reference" or (backend is None and s.device.type != "cuda"):
        out = top_k_indices_reference(s2, mask2, int(k))
    elif s.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("top_k_indices(backend='triton') needs a CUDA tensor or TRITON_INTERPRET=1")
    elif torch.compiler.is_compiling():
        out = _top_k_op(s2, mask2, int(k))
    else:
        out = top_k_indices_triton(s2, mask2, int(k))
    return out.view(*lead, k)
