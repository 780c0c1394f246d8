"""Coordinate-descent soft top-k: the Triton kernels (launched from `kernels/soft_topk.py`).

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
    the backward's programs once, to add up abar_T);
  * multi-launch (everywhere, and the only split path the interpreter runs, since it executes
    programs one after another): launch t finishes iteration t - 1 from the partials and writes
    the partials of iteration t (the backward: phase 1 partial abar_T, phase 2 the rest). No
    program ever waits for another.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    only grows, so it can start at any multiple of n_programs (the forward's counters serve the
    backward's barrier too). A program gives up
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
    n, mask_div, n_splits, n_iters, step_begin, step_end,
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
    mask_row = mask_ptr + (row // mask_div) * n  # a mask row may serve mask_div score rows
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
    n, mask_div, n_splits, n_iters,
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
    mask_row = mask_ptr + (row // mask_div) * n
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
