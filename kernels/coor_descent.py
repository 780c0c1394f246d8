"""Coordinate-descent soft top-k: Triton kernels, launchers, the torch.library op, public entry points.

Shapes: s, mask, y, ds are [rows, n] inside (the public functions flatten [..., n]); a per-row
k, the offset a_T and its gradient ga are [rows]; stats is [rows, 5, T + 1] fp32 with
T = n_iters (see `_STAT_*`).

The math is in shared/design/coordinate-descent.md. A row's whole state is one scalar `a`:

    M_t     = min(max s, -a_t)                     (the max of min(s, -a_t), known before the pass)
    S_t     = sum_i exp((min(s_i, -a_t) - M_t) / e_t),   q_t = clamped part of S_t / S_t
    a_{t+1} = e_t (log k - log S_t) - M_t
    y_i     = exp(min(s_i + a_T, 0) / e_T)

The forward keeps only (a_t, M_t, e_t, log2 S_t, q_t) per iteration; the backward is one
reduction (abar_T) and one element-wise pass with one exp per element per iteration.
`coor_descent_offset` returns a_T itself (the forward then skips y); a gradient ga on a_T just
adds to abar_T, the rest of the backward is unchanged.

Work split. A program owns `split_len` elements of one row (a multiple of BLOCK_N; when equal,
the chunk stays in registers across all iterations, otherwise it is streamed each iteration).
Rows of few programs' worth of work are split over several programs that exchange per-iteration
partial sums (count/max, then unclamped mass U and clamped count C) through a small buffer:
  * cooperative (CUDA only, grid <= SM count so every program is resident): one launch, the
    programs of a row meet at a spin barrier on a per-row counter after each iteration (and
    the backward's programs once, to add up abar_T). Eager calls keep the counters and the
    partials buffer per stream (`_split_buffers`): neither the forward nor the backward on the
    autograd engine's thread allocates or zeroes them;
  * multi-launch (everywhere, and the only split path the interpreter runs, since it executes
    programs one after another): launch t finishes iteration t - 1 from the partials and writes
    the partials of iteration t (the backward: phase 1 partial abar_T, phase 2 the rest). No
    program ever waits for another.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import check_coor_descent_args, eps_schedule
from .launch import INTERPRET, Launcher, _current_stream, aligned, off_current_device
from .reference import coor_descent_offset_reference, coor_descent_reference


LOG2E = tl.constexpr(1.4426950408889634)
# Rows in stats[row, :, t]
_STAT_A = tl.constexpr(0)
_STAT_M = tl.constexpr(1)
_STAT_E = tl.constexpr(2)
_STAT_LOG2S = tl.constexpr(3)
_STAT_Q = tl.constexpr(4)
_N_STATS = 5
_SPIN_LIMIT = tl.constexpr(20_000_000)  # a cooperative barrier gives up (wrong result, no hang) past this


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_scores(s_row, mask_row, offs, hi, HAS_MASK: tl.constexpr):
    """fp32 scores of a chunk; positions that do not take part (masked, NaN, -inf, past the
    end) read as -inf, which makes every later formula give them weight 0 without a select."""
    inb = offs < hi
    s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
    ok = inb & (s == s)
    if HAS_MASK:
        ok = ok & (tl.load(mask_row + offs, mask=inb, other=0) != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _count_max(s):
    return tl.sum((s != float("-inf")).to(tl.float32), axis=0), tl.max(s, axis=0)


@triton.jit
def _add_pair(u0, c0, u1, c1):
    return u0 + u1, c0 + c1


@triton.jit
def _mass(s, neg_a, M, c):
    """Unclamped mass U = sum exp2((s - M) c) over s <= -a, and the clamped count C; every
    clamped position has the same weight exp2((-a - M) c), so S = U + C * that. One reduction
    of the pair: a program's warps meet once per iteration instead of twice."""
    clamped = s > neg_a
    x = tl.where(clamped, float("-inf"), (s - M) * c)
    return tl.reduce((tl.exp2(x), clamped.to(tl.float32)), 0, _add_pair)


@triton.jit
def _arrive_and_wait(counter, n_programs):
    """Cooperative barrier of a row's n_programs programs: after this program's stores, count it
    in, then spin until the count reaches the end of the round its arrival fell in. The counter
    only grows, so it can start at any multiple of n_programs: a zeroed one, or one earlier
    launches on the same stream left behind (`_split_buffers`). A program gives up
    after _SPIN_LIMIT polls (wrong result, no hang) should the programs ever not all be resident."""
    tl.debug_barrier()  # every thread's stores before the one release
    arrived = tl.atomic_add(counter, 1, sem="release")
    target = (arrived // n_programs + 1) * n_programs
    spins = 0
    while (arrived < target) & (spins < _SPIN_LIMIT):
        arrived = tl.atomic_add(counter, 0, sem="acquire")
        spins += 1
    tl.debug_barrier()


@triton.jit
def _coor_descent_fwd_kernel(
    s_ptr, mask_ptr, k_ptr, y_ptr, stats_ptr, part_ptr, sync_ptr,
    n, n_splits, n_iters, step_begin, step_end,
    log_k, eps, eps_first, eps_decay,
    HAS_MASK: tl.constexpr, K_PER_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, SPLITS_P2: tl.constexpr,
    SPLIT: tl.constexpr, COOPERATIVE: tl.constexpr, WRITE_Y: tl.constexpr,
):
    # Step t < T computes this program's partial sums of iteration t; step t >= 1 first
    # finishes iteration t - 1 (combines the partials into a_t); step T writes y.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, n)
    s_row = s_ptr + row * n
    mask_row = mask_ptr + row * n
    y_row = y_ptr + row * n
    n_stat = n_iters + 1
    st = stats_ptr + row * (5 * n_stat)
    pt = part_ptr + row * (n_stat * n_splits * 2)
    if K_PER_ROW:
        log_k = tl.log(tl.load(k_ptr + row).to(tl.float32))
    zero = eps * 0.0
    offs = tl.arange(0, BLOCK_N)
    IN_REGS: tl.constexpr = SPLIT_LEN == BLOCK_N
    if IN_REGS:
        s_reg = _load_scores(s_row, mask_row, lo + offs, hi, HAS_MASK)

    # epsilon of iterations step_begin - 1 and step_begin (same fp32 ops on every path)
    e_prev = zero + eps_first
    for _ in range(1, step_begin):
        e_prev = tl.maximum(e_prev * eps_decay, eps)
    e_cur = tl.where(step_begin > 0, tl.maximum(e_prev * eps_decay, eps), e_prev)

    # state carried from earlier launches (multi-launch path only)
    n_valid = zero
    s_max = zero
    a = zero
    if SPLIT:
        if step_begin > 0:
            sidx = tl.arange(0, SPLITS_P2)
            cnt = tl.load(pt + sidx * 2, mask=sidx < n_splits, other=0.0)
            mx = tl.load(pt + sidx * 2 + 1, mask=sidx < n_splits, other=float("-inf"))
            n_valid = tl.sum(cnt, axis=0)
            s_max = tl.where(n_valid > 0, tl.max(mx, axis=0), 0.0)
        if step_begin > 1:
            a = tl.load(st + _STAT_A * n_stat + step_begin - 1)
    tot0 = zero
    tot1 = zero

    for step in range(step_begin, step_end):
        if step > 0:
            if SPLIT:
                sidx = tl.arange(0, SPLITS_P2)
                pp = pt + (step - 1) * n_splits * 2 + sidx * 2
                if COOPERATIVE:
                    p0 = tl.load(pp, mask=sidx < n_splits, other=0.0, volatile=True)
                    p1 = tl.load(pp + 1, mask=sidx < n_splits, other=0.0, volatile=True)
                else:
                    p0 = tl.load(pp, mask=sidx < n_splits, other=0.0)
                    p1 = tl.load(pp + 1, mask=sidx < n_splits, other=0.0)
                tot0 = tl.sum(p0, axis=0)
                if step == 1:
                    p1 = tl.where(sidx < n_splits, p1, float("-inf"))
                    tot1 = tl.max(p1, axis=0)
                else:
                    tot1 = tl.sum(p1, axis=0)
            if step == 1:
                n_valid = tot0
                # a fully masked row computes on dummy finite values; its y is 0 anyway
                s_max = tl.where(n_valid > 0, tot1, 0.0)
                log2_s = tl.log2(tl.maximum(n_valid, 1.0))
                a_new = e_prev * (log_k - log2_s / LOG2E)
                m_t = zero
                q_t = zero
            else:
                m_t = tl.minimum(s_max, -a)
                c = LOG2E / e_prev
                p_clamped = tl.exp2((-a - m_t) * c)
                mass = tot0 + tot1 * p_clamped
                mass = tl.where(mass > 0, mass, 1.0)
                log2_s = tl.log2(mass)
                q_t = tot1 * p_clamped / mass
                a_new = e_prev * (log_k - log2_s / LOG2E) - m_t
            if split == 0:
                tl.store(st + _STAT_M * n_stat + step - 1, m_t)
                tl.store(st + _STAT_E * n_stat + step - 1, e_prev)
                tl.store(st + _STAT_LOG2S * n_stat + step - 1, log2_s)
                tl.store(st + _STAT_Q * n_stat + step - 1, q_t)
                tl.store(st + _STAT_A * n_stat + step, a_new)
            a = a_new

        if step < n_iters:
            if step == 0:
                if IN_REGS:
                    tot0, tot1 = _count_max(s_reg)
                else:
                    tot0 = zero
                    tot1 = zero + float("-inf")
                    for off in range(lo, hi, BLOCK_N):
                        cnt_c, max_c = _count_max(_load_scores(s_row, mask_row, off + offs, hi, HAS_MASK))
                        tot0 += cnt_c
                        tot1 = tl.maximum(tot1, max_c)
            else:
                m_t = tl.minimum(s_max, -a)
                c = LOG2E / e_cur
                if IN_REGS:
                    tot0, tot1 = _mass(s_reg, -a, m_t, c)
                else:
                    tot0 = zero
                    tot1 = zero
                    for off in range(lo, hi, BLOCK_N):
                        u_c, c_c = _mass(_load_scores(s_row, mask_row, off + offs, hi, HAS_MASK), -a, m_t, c)
                        tot0 += u_c
                        tot1 += c_c
            if SPLIT:
                tl.store(pt + step * n_splits * 2 + split * 2, tot0)
                tl.store(pt + step * n_splits * 2 + split * 2 + 1, tot1)
                if COOPERATIVE:
                    _arrive_and_wait(sync_ptr + row, n_splits)
        else:
            c = LOG2E / e_cur
            if split == 0:
                tl.store(st + _STAT_E * n_stat + step, e_cur)
            if WRITE_Y:
                if IN_REGS:
                    y = tl.exp2(tl.minimum(s_reg + a, 0.0) * c)
                    tl.store(y_row + lo + offs, y.to(y_ptr.dtype.element_ty), mask=lo + offs < hi)
                else:
                    for off in range(lo, hi, BLOCK_N):
                        sc = _load_scores(s_row, mask_row, off + offs, hi, HAS_MASK)
                        y = tl.exp2(tl.minimum(sc + a, 0.0) * c)
                        tl.store(y_row + off + offs, y.to(y_ptr.dtype.element_ty), mask=off + offs < hi)
        e_prev = e_cur
        e_cur = tl.maximum(e_cur * eps_decay, eps)


@triton.jit
def _direct(s, gy, a_T, c_T, inv_e_T):
    """dL/dy * dy/ds at fixed a_T: gy y / e_T where s + a_T <= 0 (and the position takes part)."""
    y = tl.exp2(tl.minimum(s + a_T, 0.0) * c_T)
    keep = (s + a_T <= 0.0) & (s != float("-inf"))
    return tl.where(keep, gy * y * inv_e_T, 0.0)


@triton.jit
def _chain(s, acc, abar_T, st, n_stat, n_iters):
    """acc - sum_{t=1}^{T-1} abar_{t+1} softmax_t(s) [s <= -a_t]; abar_t = abar_{t+1} q_t."""
    ab = abar_T
    for i in range(1, n_iters):
        t = n_iters - i
        a_t = tl.load(st + _STAT_A * n_stat + t)
        m_t = tl.load(st + _STAT_M * n_stat + t)
        c = LOG2E / tl.load(st + _STAT_E * n_stat + t)
        log2_s = tl.load(st + _STAT_LOG2S * n_stat + t)
        x = tl.where(s > -a_t, float("-inf"), (s - m_t) * c - log2_s)
        acc -= ab * tl.exp2(x)
        ab = ab * tl.load(st + _STAT_Q * n_stat + t)
    return acc


@triton.jit
def _direct_chunk(s_row, mask_row, gy_row, off, offs, hi, a_T, c_T, inv_e_T,
                  HAS_MASK: tl.constexpr, HAS_GY: tl.constexpr):
    """Scores of a chunk and their direct term (0 where there is no gradient of y)."""
    s = _load_scores(s_row, mask_row, off + offs, hi, HAS_MASK)
    if HAS_GY:
        gy = tl.load(gy_row + off + offs, mask=off + offs < hi, other=0.0).to(tl.float32)
        direct = _direct(s, gy, a_T, c_T, inv_e_T)
    else:
        direct = offs.to(tl.float32) * 0.0
    return s, direct


@triton.jit
def _coor_descent_bwd_kernel(
    gy_ptr, s_ptr, mask_ptr, k_ptr, stats_ptr, part_ptr, sync_ptr, ga_ptr, ds_ptr, dk_ptr,
    n, n_splits, n_iters,
    HAS_MASK: tl.constexpr, K_PER_ROW: tl.constexpr, HAS_GY: tl.constexpr, HAS_GA: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, SPLITS_P2: tl.constexpr,
    # 0: whole row here; 1: partial abar_T only; 2: combine the partials, then ds;
    # 3 (cooperative): 1, a barrier of the row's programs, then 2, in one launch
    PHASE: tl.constexpr,
):
    # gy = dL/dy (HAS_GY) and ga = dL/da_T (HAS_GA, per row): abar_T = sum_i direct_i + ga.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, n)
    s_row = s_ptr + row * n
    mask_row = mask_ptr + row * n
    gy_row = gy_ptr + row * n
    ds_row = ds_ptr + row * n
    n_stat = n_iters + 1
    st = stats_ptr + row * (5 * n_stat)
    a_T = tl.load(st + _STAT_A * n_stat + n_iters)
    e_T = tl.load(st + _STAT_E * n_stat + n_iters)
    c_T = LOG2E / e_T
    inv_e_T = 1.0 / e_T
    offs = tl.arange(0, BLOCK_N)
    IN_REGS: tl.constexpr = SPLIT_LEN == BLOCK_N

    if IN_REGS:
        s, direct = _direct_chunk(s_row, mask_row, gy_row, lo, offs, hi, a_T, c_T, inv_e_T, HAS_MASK, HAS_GY)

    sidx = tl.arange(0, SPLITS_P2)
    if PHASE == 2:
        abar_T = tl.sum(tl.load(part_ptr + row * n_splits + sidx, mask=sidx < n_splits, other=0.0), axis=0)
    else:
        if IN_REGS:
            abar_T = tl.sum(direct, axis=0)
        else:
            abar_T = e_T * 0.0
            if HAS_GY:
                for off in range(lo, hi, BLOCK_N):
                    _, dc = _direct_chunk(s_row, mask_row, gy_row, off, offs, hi, a_T, c_T, inv_e_T, HAS_MASK, HAS_GY)
                    abar_T += tl.sum(dc, axis=0)

    if PHASE % 2 == 1:  # 1 or 3
        tl.store(part_ptr + row * n_splits + split, abar_T)
    if PHASE == 3:
        _arrive_and_wait(sync_ptr + row, n_splits)
        # the same sum, in the same order, as phase 2's
        abar_T = tl.sum(tl.load(part_ptr + row * n_splits + sidx, mask=sidx < n_splits, other=0.0, volatile=True),
                        axis=0)
    if PHASE != 1:
        if HAS_GA:
            # once per row: phase 2 sums the partials of direct alone (a row without gy runs
            # phase 0 on every split, where each program's abar_T is ga alone)
            abar_T += tl.load(ga_ptr + row).to(tl.float32)
        if IN_REGS:
            ds = _chain(s, direct, abar_T, st, n_stat, n_iters)
            tl.store(ds_row + lo + offs, ds.to(ds_ptr.dtype.element_ty), mask=lo + offs < hi)
        else:
            for off in range(lo, hi, BLOCK_N):
                sc, dc = _direct_chunk(s_row, mask_row, gy_row, off, offs, hi, a_T, c_T, inv_e_T, HAS_MASK, HAS_GY)
                ds = _chain(sc, dc, abar_T, st, n_stat, n_iters)
                tl.store(ds_row + off + offs, ds.to(ds_ptr.dtype.element_ty), mask=off + offs < hi)
        if K_PER_ROW:
            if split == 0:
                # dk = sum_{t=0}^{T-1} abar_{t+1} e_t / k
                ab = abar_T
                acc = abar_T * 0.0
                for i in range(0, n_iters):
                    t = n_iters - 1 - i
                    acc += ab * tl.load(st + _STAT_E * n_stat + t)
                    ab = ab * tl.load(st + _STAT_Q * n_stat + t)
                tl.store(dk_ptr + row, acc / tl.load(k_ptr + row).to(tl.float32))


# --------------------------------------------------------------------------------------------
# Launch planning and launchers
# --------------------------------------------------------------------------------------------

# Largest chunk a program keeps in registers (fp32 scores): 32768 = 128 per thread at 8 warps.
MAX_REG_BLOCK = 32768
# A row is split over programs when rows alone leave most SMs idle and a row is this long.
MIN_SPLIT_N = 16384
MIN_SPLIT_LEN = 4096

# Tests set these to force small chunks / splits / the multi-launch path on tiny rows, and to
# fill outputs with NaN before the kernels write them (an unwritten element then fails).
_FORCE: dict = {}
_POISON = False


@dataclass(frozen=True, eq=False)  # hashed by identity: launch keys hold the (cached) plan
class _Plan:
    """How a [rows, n] call is spread over programs. One object per (rows, n, device, forced
    options), so a launch key that holds it fixes rows, n and every launch parameter."""

    rows: int
    n: int
    block_n: int
    split_len: int
    n_splits: int
    cooperative: bool
    num_warps: int
    # n_splits rounded up to a power of 2, kept here: triton.next_power_of_2 costs ~4 us of
    # host time per call (a ConstexprFunction), twice per eager step.
    splits_p2: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.rows, self.n_splits, 1)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _plan(rows: int, n: int, device: torch.device) -> _Plan:
    if _FORCE:
        return _cached_plan(rows, n, device, tuple(_FORCE.items()))
    return _cached_plan(rows, n, device)


@functools.lru_cache(maxsize=1024)
def _cached_plan(rows: int, n: int, device: torch.device, force: tuple = ()) -> _Plan:
    return _make_plan(rows, n, device, **dict(force))


def _make_plan(
    rows: int, n: int, device: torch.device, *, block_n: int | None = None, split_len: int | None = None,
    cooperative: bool = True, num_warps: int | None = None,
) -> _Plan:
    sms = _num_sms(device)
    if split_len is None:
        if n >= MIN_SPLIT_N and rows * 2 <= sms:
            n_splits = max(1, min(sms // rows, triton.cdiv(n, MIN_SPLIT_LEN)))
            split_len = triton.cdiv(n, n_splits)
        else:
            split_len = n
    block_n = min(block_n or MAX_REG_BLOCK, triton.next_power_of_2(split_len))
    split_len = triton.cdiv(split_len, block_n) * block_n
    n_splits = triton.cdiv(n, split_len)
    cooperative = cooperative and n_splits > 1 and device.type == "cuda" and not INTERPRET and rows * n_splits <= sms
    if num_warps is None:
        # H100, CUDA-graph f+b (`coor_descent.py --tune`, benchmarks/NOTES-coor_descent.md): 2 warps
        # at <= 1024 elements per program (1024 x 1024: 36.6 vs 45.6 us at 4), 8 at 4096-8192
        # (16 x 4096: 29.3 vs 37.2 at 4; 256 x 8192: 65.4 vs 69.2; split rows of 4096 per program
        # 52-57 vs 59-62); 8 beats 16 at 32768 per program (1024 x 32768 fwd 367 vs 494 us, bwd 0.7
        # vs 7.2 ms), in the cooperative split kernel too (4 x 1M fwd 85.7 vs 102.2 us, bwd 79.6 vs
        # 94.7, this kernel with int64 counters; an earlier one measured fwd 105 vs 126 the other way).
        num_warps = 2 if block_n <= 1024 else 4 if block_n <= 2048 else 8
    return _Plan(rows, n, block_n, split_len, n_splits, cooperative, num_warps, triton.next_power_of_2(n_splits))


# Launches go through Launcher.keyed with keys built from the plan, the dtypes, the flags, the
# pointers' alignment and the step (forward) or phase (backward): together they fix every
# specialization of the runtime arguments (the integers are all functions of the plan, n_iters
# and the step or phase), and the constexprs and warps are read back from the key on a miss.


def _fwd_spec(key) -> tuple[dict, int]:
    plan, _, _, has_mask, k_per_row, write_y, *_ = key
    return dict(HAS_MASK=has_mask, K_PER_ROW=k_per_row, BLOCK_N=plan.block_n, SPLIT_LEN=plan.split_len,
                SPLITS_P2=plan.splits_p2, SPLIT=plan.n_splits > 1, COOPERATIVE=plan.cooperative,
                WRITE_Y=write_y), plan.num_warps


def _bwd_spec(key) -> tuple[dict, int]:
    plan, _, _, _, _, has_mask, k_per_row, has_gy, has_ga, _, _, phase = key
    return dict(HAS_MASK=has_mask, K_PER_ROW=k_per_row, HAS_GY=has_gy, HAS_GA=has_ga, BLOCK_N=plan.block_n,
                SPLIT_LEN=plan.split_len, SPLITS_P2=plan.splits_p2, PHASE=phase), plan.num_warps


# Split rows exchange partial sums through a buffer and, cooperative, meet at a counter per
# row. Eager forwards keep both per (device, stream, n_splits) and reuse them: the stream runs
# the kernels that share them one after another, and a counter only grows by whole rounds of
# its row's n_splits programs, so it never needs zeroing again. That saves an allocation and a
# fill kernel per forward, ~10 us of host time on the H100 hosts. Fresh ones: under CUDA-graph
# capture (a graph may be replayed on another stream), and in the library op that
# torch.compile runs (cudagraph trees warm up with allocations routed to the graph's pool,
# where a kept tensor would be a live allocation the trees refuse). int64 counters never wrap.
# Assumed: a stream handle is not reused while kernels of a destroyed stream still run (torch's
# own streams are pooled, never destroyed; an external one freed mid-flight could break that).
_SPLIT_BUFFERS: dict = {}


def _split_buffers(device: torch.device, plan: _Plan, n_partials: int, keep: bool) -> tuple[Tensor, Tensor | None]:
    """-> (fp32 partials of at least n_partials elements, int64 counters [>= rows] or None);
    kept ones if `keep` and the stream allows it."""
    n_counters = plan.rows if plan.cooperative else 0
    if keep and device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        key = (device.index, _current_stream(device.index), plan.n_splits)
        kept = _SPLIT_BUFFERS.get(key)
        if kept is None or kept[0].numel() < n_partials or kept[1].numel() < n_counters:
            if kept is not None:  # grow, never shrink: calls with other row counts share the entry
                n_partials, n_counters = max(n_partials, kept[0].numel()), max(n_counters, kept[1].numel())
            kept = _SPLIT_BUFFERS[key] = _new_split_buffers(device, n_partials, n_counters)
        part, counters = kept
    else:
        part, counters = _new_split_buffers(device, n_partials, n_counters)
    return part, (counters if plan.cooperative else None)


def _new_split_buffers(device: torch.device, n_partials: int, n_counters: int) -> tuple[Tensor, Tensor]:
    return (torch.empty(n_partials, device=device, dtype=torch.float32),
            torch.zeros(n_counters, device=device, dtype=torch.int64))


_launch_fwd = Launcher(_coor_descent_fwd_kernel)
_launch_bwd = Launcher(_coor_descent_bwd_kernel)


def coor_descent_fwd(
    s: Tensor, mask: Tensor | None, k_rows: Tensor | None, k: float, n_iters: int,
    eps: float, eps_first: float, eps_decay: float, *, write_y: bool = True, keep_buffers: bool = True,
) -> tuple[Tensor, Tensor, tuple | None]:
    """s [rows, n] -> (y [rows, n] in s.dtype, stats [rows, 5, n_iters + 1] fp32, scratch).

    write_y=False skips y (returned empty [0]); the offset a_T is stats[:, _STAT_A, n_iters].
    scratch: (plan, partials, barrier counters), the latter two None unless rows are split, for
    coor_descent_bwd to reuse instead of choosing a plan and allocating and zeroing buffers of
    its own (host time on the autograd engine's thread); None for an empty s. keep_buffers=False:
    split rows get buffers of this call's own (see `_split_buffers`).
    """
    s = s.contiguous()
    rows, n = s.shape
    y = torch.empty_like(s) if write_y else s.new_empty(0)
    stats = s.new_empty((rows, _N_STATS, n_iters + 1), dtype=torch.float32)
    if _POISON:
        y.fill_(float("nan"))
        stats.fill_(float("nan"))
    if rows == 0 or n == 0:
        return y, stats.zero_(), None
    plan = _plan(rows, n, s.device)
    mask_arg = s if mask is None else mask.contiguous().view(torch.uint8)
    k_arg = stats if k_rows is None else k_rows.contiguous()
    part = sync = None
    if plan.n_splits > 1:  # partials [rows, n_iters + 1, n_splits, 2]
        part, sync = _split_buffers(s.device, plan, rows * (n_iters + 1) * plan.n_splits * 2, keep_buffers)
    key = (plan, s.dtype, k_arg.dtype, mask is not None, k_rows is not None, write_y, n_iters,
           aligned(s, mask_arg, k_arg))
    # unused pointer arguments get a tensor of the call (the kernel never reads them)
    args = (s, mask_arg, k_arg, y if write_y else s, stats, stats if part is None else part,
            stats if sync is None else sync, n, plan.n_splits, n_iters)
    # floats even when given ints: Triton would make an int 1 a constant of the kernel
    scalars = (math.log(k), float(eps), float(eps_first), float(eps_decay))
    if plan.n_splits == 1 or plan.cooperative:
        _launch_fwd.keyed((*key, 0), plan.grid, (*args, 0, n_iters + 1, *scalars), _fwd_spec)
    else:
        for step in range(n_iters + 1):
            _launch_fwd.keyed((*key, step), plan.grid, (*args, step, step + 1, *scalars), _fwd_spec)
    return y, stats, (plan, part, sync)


def coor_descent_bwd(
    gy: Tensor | None, s: Tensor, mask: Tensor | None, k_rows: Tensor | None, stats: Tensor, n_iters: int,
    ga: Tensor | None = None, scratch: tuple | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gradients from gy = dL/dy [rows, n] and/or ga = dL/da_T [rows] (None: no such gradient)
    -> (ds [rows, n] in s.dtype, dk [rows] fp32, or None when k is a number). scratch: what
    coor_descent_fwd returned for these rows (its plan, and its buffers for split rows: the
    partials buffer is larger than the backward's, the barrier counts rounds from wherever the
    forward left it), or None."""
    s = s.contiguous()
    rows, n = s.shape
    ds = torch.empty_like(s)
    dk = None if k_rows is None else s.new_empty(rows, dtype=torch.float32)
    if _POISON:
        ds.fill_(float("nan"))
        if dk is not None:
            dk.fill_(float("nan"))
    if rows == 0 or n == 0:
        return ds, (dk.zero_() if dk is not None else None)
    plan = _plan(rows, n, s.device) if scratch is None else scratch[0]
    gy_arg = s if gy is None else gy.contiguous()
    # a_T of a row with nothing valid is the constant 0: no gradient flows through it.
    ga_arg = stats if ga is None else (ga * _has_valid(s, mask)).contiguous()
    mask_arg = s if mask is None else mask.contiguous().view(torch.uint8)
    k_arg = stats if k_rows is None else k_rows.contiguous()
    part = sync = None
    # Without gy, abar_T = ga needs no reduction over the row: every split runs phase 0.
    if plan.n_splits == 1 or gy is None:
        phases = (0,)
    else:  # per-split partial sums of abar_T, exchanged between phases 1 and 2 (or inside 3)
        phases = (3,) if plan.cooperative else (1, 2)
        if scratch is not None:
            _, part, sync = scratch
        else:  # partials [rows, n_splits]; called so by the library op only (or directly)
            part, sync = _split_buffers(s.device, plan, rows * plan.n_splits, keep=False)
    key = (plan, s.dtype, gy_arg.dtype, k_arg.dtype, ga_arg.dtype, mask is not None, k_rows is not None,
           gy is not None, ga is not None, n_iters, aligned(s, gy_arg, mask_arg, k_arg, ga_arg))
    args = (gy_arg, s, mask_arg, k_arg, stats, stats if part is None else part, stats if sync is None else sync,
            ga_arg, ds, stats if dk is None else dk, n, plan.n_splits, n_iters)
    for phase in phases:
        _launch_bwd.keyed((*key, phase), plan.grid, args, _bwd_spec)
    return ds, dk


# --------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile: no graph break) and their autograd
# --------------------------------------------------------------------------------------------

_FWD_SCHEMA = (
    "(Tensor s, Tensor? mask, Tensor? k_rows, float k, int n_iters, float eps, float eps_first, "
    "float eps_decay) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor? gy, Tensor s, Tensor? mask, Tensor? k_rows, Tensor stats, Tensor? ga, int n_iters) "
    "-> (Tensor, Tensor)"
)


def _has_valid(s: Tensor, mask: Tensor | None) -> Tensor:
    """[rows] bool: the row has a position that takes part (unmasked, not NaN, not -inf)."""
    valid = (s == s) & (s != float("-inf"))
    return (valid if mask is None else valid & mask).any(dim=-1)


def _offset_of(stats: Tensor, n_iters: int, s: Tensor, mask: Tensor | None) -> Tensor:
    """a_T [rows] fp32, 0 for a row with nothing valid (a new tensor: a custom op's outputs
    may not alias one another). Done here, not in the kernel: a select on the last iteration
    inside the forward kernel's loop miscompiled on an H100 (triton 3.6), giving wrong y."""
    a = stats[:, _STAT_A.value, n_iters]
    return torch.where(_has_valid(s, mask), a, torch.zeros_like(a))


def _fake_stats(s: Tensor, n_iters: int) -> Tensor:
    return s.new_empty((s.shape[0], _N_STATS, n_iters + 1), dtype=torch.float32)


@torch.library.custom_op("colt5::coor_descent_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _fwd_op(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay):
    y, stats, _ = coor_descent_fwd(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay, keep_buffers=False)
    return y, stats


@_fwd_op.register_fake
def _(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay):
    return torch.empty_like(s, memory_format=torch.contiguous_format), _fake_stats(s, n_iters)


@torch.library.custom_op("colt5::coor_descent_offset_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _offset_fwd_op(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay):
    """-> (a_T [rows] fp32, stats): the forward without y."""
    _, stats, _ = coor_descent_fwd(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay, write_y=False,
                                   keep_buffers=False)
    return _offset_of(stats, n_iters, s, mask), stats


@_offset_fwd_op.register_fake
def _(s, mask, k_rows, k, n_iters, eps, eps_first, eps_decay):
    return s.new_empty((s.shape[0],), dtype=torch.float32), _fake_stats(s, n_iters)


@torch.library.custom_op("colt5::coor_descent_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _bwd_op(gy, s, mask, k_rows, stats, ga, n_iters):
    ds, dk = coor_descent_bwd(gy, s, mask, k_rows, stats, n_iters, ga)
    return ds, (dk if dk is not None else s.new_empty((0,), dtype=torch.float32))


@_bwd_op.register_fake
def _(gy, s, mask, k_rows, stats, ga, n_iters):
    dk = s.new_empty((s.shape[0] if k_rows is not None else 0,), dtype=torch.float32)
    return torch.empty_like(s, memory_format=torch.contiguous_format), dk


def _setup_context(ctx, inputs, output):
    s, mask, k_rows, _k, n_iters, *_ = inputs
    ctx.save_for_backward(s, mask, k_rows, output[1])
    ctx.n_iters = n_iters


def _grads(k_rows, ds, dk) -> tuple:
    return ds, None, (dk if k_rows is not None else None), None, None, None, None, None


def _backward(ctx, gy, _gstats):
    s, mask, k_rows, stats = ctx.saved_tensors
    return _grads(k_rows, *_bwd_op(gy, s, mask, k_rows, stats, None, ctx.n_iters))


def _offset_backward(ctx, ga, _gstats):
    s, mask, k_rows, stats = ctx.saved_tensors
    return _grads(k_rows, *_bwd_op(None, s, mask, k_rows, stats, ga, ctx.n_iters))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_offset_fwd_op.register_autograd(_offset_backward, setup_context=_setup_context)


class CoorDescentFunction(torch.autograd.Function):
    """The eager path: same launchers as the library op, without the dispatcher's host cost.
    The scalars (k, n_iters, eps, eps_first, eps_decay) come as one tuple: apply's host cost
    grows with its argument count."""

    @staticmethod
    def forward(ctx, s, mask, k_rows, scalars):
        y, stats, ctx.scratch = coor_descent_fwd(s, mask, k_rows, *scalars)
        ctx.save_for_backward(s, mask, k_rows, stats)
        ctx.n_iters = scalars[1]
        return y

    @staticmethod
    def backward(ctx, gy):
        s, mask, k_rows, stats = ctx.saved_tensors
        ds, dk = coor_descent_bwd(gy, s, mask, k_rows, stats, ctx.n_iters, scratch=ctx.scratch)
        return ds, None, dk, None


class CoorDescentOffsetFunction(torch.autograd.Function):
    """Eager path of the offset: -> a_T [rows] fp32; its backward feeds dL/da_T into abar_T."""

    @staticmethod
    def forward(ctx, s, mask, k_rows, scalars):
        _, stats, ctx.scratch = coor_descent_fwd(s, mask, k_rows, *scalars, write_y=False)
        ctx.save_for_backward(s, mask, k_rows, stats)
        ctx.n_iters = scalars[1]
        return _offset_of(stats, scalars[1], s, mask)

    @staticmethod
    def backward(ctx, ga):
        s, mask, k_rows, stats = ctx.saved_tensors
        ds, dk = coor_descent_bwd(None, s, mask, k_rows, stats, ctx.n_iters, ga, ctx.scratch)
        return ds, None, dk, None


def _bare_apply(function: type[torch.autograd.Function]):
    """function.apply without its Python wrapper (2-3 us of host time per call on our dev CPU:
    it re-wraps every argument), which only matters for setup_context-style Functions and under
    functorch transforms; those still go through function.apply."""
    bare = super(torch.autograd.Function, function).apply

    def apply(*args):
        if torch._C._are_functorch_transforms_active():
            return function.apply(*args)
        return bare(*args)

    return apply


_apply_coor_descent = _bare_apply(CoorDescentFunction)
_apply_coor_descent_offset = _bare_apply(CoorDescentOffsetFunction)

# Tests set this to run the library op (what torch.compile sees) in eager mode too.
_EAGER_VIA_OP = False


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def triton_coor_descent(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """`coor_descent` on the Triton kernels, whatever the device (see `coor_descent`).

    Computes in fp32 for every input dtype (fp64 too) and returns `s.dtype`. On CPU tensors it
    needs Triton's interpreter, i.e. TRITON_INTERPRET=1 set before colt5 was imported.

    Raises:
        TypeError / ValueError naming the argument for invalid arguments; RuntimeError for a
        CPU tensor without the interpreter.
    """
    check_coor_descent_args(
        s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
    )
    return _triton_coor_descent(s, n_iters, k, eps, eps_init, eps_decay, mask)


def _check_triton_device(s: Tensor, name: str) -> None:
    if not s.is_cuda and not INTERPRET:
        raise RuntimeError(
            f"{name} needs a CUDA tensor, or TRITON_INTERPRET=1 set in the environment "
            f"before colt5 is imported to run the Triton kernels on {s.device.type}; got s on "
            f"{s.device}. Use coor_descent(...) for the PyTorch reference."
        )


def _launch_args(s, n_iters, k, eps, eps_init, eps_decay, mask) -> tuple:
    """The fwd op's arguments for [..., n] inputs: rows flattened, per-row k in fp32."""
    n = s.shape[-1]
    eps_first = max(eps_init if eps_init is not None else eps, eps)
    # 2-D inputs go in as they are: a reshape, and the view back, would be two more autograd
    # nodes for the engine to run in an eager backward that is already host-bound.
    s2 = s if s.dim() == 2 else s.reshape(-1, n)
    mask2 = mask if mask is None or mask.dim() == 2 else mask.reshape(-1, n)
    if isinstance(k, Tensor):
        k_rows, k_val = k.reshape(-1).to(device=s.device, dtype=torch.float32), 1.0
    else:
        k_rows, k_val = None, float(k)
    return (s2, mask2, k_rows, k_val, int(n_iters), float(eps), float(eps_first), float(eps_decay))


def _needs_grad(args: tuple) -> bool:
    """An autograd node is needed: without one (inference, no_grad) the forward skips
    Function.apply, ~9 us of host time on an H100 host."""
    s, _, k_rows = args[:3]
    return torch.is_grad_enabled() and (s.requires_grad or (k_rows is not None and k_rows.requires_grad))


def _use_op() -> bool:
    return _EAGER_VIA_OP or torch.compiler.is_compiling()


def _triton_coor_descent(s, n_iters, k, eps, eps_init, eps_decay, mask) -> Tensor:
    _check_triton_device(s, "triton_coor_descent")
    if off_current_device(s):  # the backward needs no switch: autograd runs it on s's device
        with torch.cuda.device(s.device):
            return _triton_coor_descent(s, n_iters, k, eps, eps_init, eps_decay, mask)
    if s.numel() == 0:
        return coor_descent_reference(
            s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
        )
    args = _launch_args(s, n_iters, k, eps, eps_init, eps_decay, mask)
    if _use_op():
        y, _ = _fwd_op(*args)
    elif _needs_grad(args):
        y = _apply_coor_descent(*args[:3], args[3:])
    else:
        y, _, _ = coor_descent_fwd(*args)
    return y if s.dim() == 2 else y.view(s.shape)


def _triton_coor_descent_offset(s, n_iters, k, eps, eps_init, eps_decay, mask) -> tuple[Tensor, float]:
    _check_triton_device(s, "coor_descent_offset(backend='triton')")
    if off_current_device(s):
        with torch.cuda.device(s.device):
            return _triton_coor_descent_offset(s, n_iters, k, eps, eps_init, eps_decay, mask)
    e_T = eps_schedule(n_iters, eps, eps_init, eps_decay)[-1]
    if s.numel() == 0:
        a, _ = coor_descent_offset_reference(
            s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
        )
        return a.float(), e_T
    args = _launch_args(s, n_iters, k, eps, eps_init, eps_decay, mask)
    if _use_op():
        a, _ = _offset_fwd_op(*args)
    elif _needs_grad(args):
        a = _apply_coor_descent_offset(*args[:3], args[3:])
    else:
        _, stats, _ = coor_descent_fwd(*args, write_y=False)
        a = _offset_of(stats, n_iters, args[0], args[1])
    return a.view(*s.shape[:-1], 1), e_T


def _dispatch(triton_impl, reference_impl, s, n_iters, k, eps, eps_init, eps_decay, mask, backend):
    """Validate once, then the Triton kernels (CUDA by default, or backend="triton") or the
    PyTorch reference (backend="reference", or a non-CUDA tensor by default)."""
    check_coor_descent_args(
        s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
    )
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend must be 'triton', 'reference' or None, got {backend!r}")
    if backend == "triton" or (backend is None and s.device.type == "cuda"):
        return triton_impl(s, n_iters, k, eps, eps_init, eps_decay, mask)
    return reference_impl(s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)


def coor_descent(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    backend: Literal["triton", "reference"] | None = None,
) -> Tensor:
    """Soft top-k over the last dimension of `s` by coordinate descent with epsilon scaling.

    Returns weights `y` of the shape and dtype of `s`, each in [0, 1], summing to about `k` per
    row: the solution of max_y s.y + eps H(y) s.t. sum(y) = k, 0 <= y <= 1.

    Args:
        s: scores [..., n], fp32/fp16/bf16 (computed in fp32; fp64 is computed in fp64 by the
            reference, in fp32 by the Triton kernels).
        n_iters: iterations, >= 1.
        k: target sum, a number > 0 or a tensor of shape s.shape[:-1] (per-row k; it gets a
            gradient when it requires one).
        eps: final epsilon (> 0); eps_init: first epsilon (default eps); eps_decay in (0, 1]:
            per-iteration factor, epsilon never going below eps.
        mask: bool [..., n], True = take part. Masked positions get 0 and no gradient; a fully
            masked row gives zeros.
        backend: "triton" or "reference"; default Triton for CUDA tensors, else the reference.

    Non-finite scores: +inf takes weight 1; -inf and NaN are treated as masked (weight 0, zero
    gradient). Nothing is NaN unless an input is.

    Raises:
        TypeError / ValueError naming the argument for invalid arguments; RuntimeError for
        backend="triton" on a CPU tensor without TRITON_INTERPRET=1.
    """
    return _dispatch(_triton_coor_descent, coor_descent_reference, s, n_iters, k, eps, eps_init, eps_decay, mask, backend)


def coor_descent_offset(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    backend: Literal["triton", "reference"] | None = None,
) -> tuple[Tensor, float]:
    """The dual offset of `coor_descent`: (a_T, e_T) with, at every valid position,

        coor_descent(s, ...) == exp(min(s + a_T, 0) / e_T)

    so a caller can apply a row's threshold to other scores (the causal router does). Arguments,
    validation and the non-finite-score rules are those of `coor_descent`; y is not computed.

    Returns:
        a_T: [..., 1], fp32 (fp64 for fp64 scores on the reference), differentiable with respect
            to s (and to a per-row k tensor). A row with no valid position gets a_T = 0 and no
            gradient through it.
        e_T: the final epsilon, a Python float (`checks.eps_schedule(...)[-1]`).

    Raises:
        TypeError / ValueError naming the argument for invalid arguments; RuntimeError for
        backend="triton" on a CPU tensor without TRITON_INTERPRET=1.
    """
    return _dispatch(_triton_coor_descent_offset, coor_descent_offset_reference, s, n_iters, k, eps, eps_init, eps_decay, mask, backend)
