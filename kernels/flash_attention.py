"""Flash attention in Triton for both attention branches: the heavy (routed) attention and the
light (windowed) attention share one forward kernel and two backward kernels.

Shapes: b batch, i queries, j keys, h heads, r key-value routes, g = h / r heads per route,
dh head dim (a power of two, 16..128, for the kernels); local attention: n tokens, w window.

Layouts, read through strides (the kernels never need a copy):
  heavy  q [b, i, h, dh]; kv [b, r, j, 2, g, dh] with k = kv[:, :, :, 0], v = kv[:, :, :, 1]:
         route r serves heads r*g .. r*g+g-1. Each head has its own k/v; the masks, value
         scales and positions [b, r, j] are shared by the heads of a route.
  local  qkv [b, n, 3, h, dh], the qkv projection's output viewed: one route, g = h.
Outputs: o [b, i, h, dh] contiguous; for the backward the log-sum-exp (base 2) per (b, h, query);
gradients in the inputs' layouts (the local one as a single dqkv tensor).

Visibility of key j to query i: j in range and kv_mask[j], then per mode
  heavy  kv_pos[j] <= q_pos[i] when positions are given; with window slots also
         j // Ckv <= i // Cq (no key of a later window), and with a span K also
         j >= (i // Cq + 1) * Ckv - K (the K most recent key slots up to the query's window);
  local  key window within [-look_backward, look_forward] of the query's; causal j <= i;
         exact_windowsize i - j <= w * look_backward (and, non-causal, j - i <= w * look_forward).
Each program of the forward and of the dq kernel loops only over the key blocks its rows may
see (`_kv_range`); each dk/dv program only over the query blocks that may see its keys
(`_q_range`). A 128-query block with w = 128 and look 1/1 touches 384 keys. Tiles that every
row of the block may see whole (the `EVERY` ranges, by index, then per tile every key unmasked
and, with positions, at or before the block's smallest query position) skip the masks and the
sanitising below: in the language model's light attention (w = 512) most tiles are such, and
in the heavy one the tiles of earlier windows.

Online softmax in fp32 (exp2, the scale folded into log2 units). The learned null key/value is
its initial state (m = q . null_k * scale, l = 1, acc = null_v), so it is never concatenated.
A query with nothing visible gets 0 and an lse of +inf, which zeroes its probabilities, so its
gradients are 0 too.

NaN/inf safety, exact per query: an output depends only on its own q and the keys it may see.
A query whose q, or a visible key's k or value (times kv_scale), holds a NaN or inf outputs NaN,
a constant: no gradient goes back through it. Scores, probabilities and ds of invisible pairs
are selected away with tl.where, never multiplied by a mask, and no non-finite entry is an
operand of a dot that contracts over the other side's rows (p @ v, ds @ k, p^T @ do, ds^T @ q),
where 0 * NaN would cross from an invisible pair to the visible ones (except in whole tiles,
which hold no invisible pair). The null value counts as a visible key: a non-finite one marks
every query of its head.
  forward  entries where k or v * kv_scale is not finite are 0 in v and NaN in k, so the key's
           scores are NaN; a visible NaN (or +inf) score makes l_i NaN (it is at most 1 + j
           otherwise) and NaN survives every later rescale: that marks the row, o = lse = NaN
           (also for a non-finite q, tested once per row). A full tile keeps its values, as
           every row sees them: a -inf score (an infinite k) is turned NaN, and a non-finite
           value leaves acc non-finite, which marks the row too (tested once per row). A finite
           q . k beyond fp32's range marks the row as well (+inf scores in any tile, -inf ones
           in whole tiles).
  dq       those entries are 0 in both k and v; a full tile's values are finite for every live
           row (its forward saw them), and the rows that are not live are dropped.
  backward a row with lse NaN is not live: its dq is 0 (its p and ds are 0 too, but in the
           dq kernel's whole tiles, where they only reach its own dq row), and dk/dv zero its
           q and do rows (they may hold NaN) and select its p and ds away. A live row's q, o
           and lse are finite, so an output with a zero cotangent passes back exactly nothing
           too.
Cost: per key tile that is not whole, in the forward and dq kernels, abs, compare and select on
the k and v tiles; per whole tile of the forward a compare and a select on the scores, and per
row one check of acc; per query tile of dk/dv a compare and a select on the q and do tiles, and
on a whole tile two selects of the rows that are not live instead of the mask.

Backward, deterministic (no atomics): kernel 1 per query block writes delta = rowsum(do * o),
dq and per-block partial sums of the null key/value gradients; kernel 2 per key block writes dk,
dv and per-head partial sums of the kv_scale gradient; torch sums reduce the partials.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .flash_attention_reference import attention_reference, local_attention_packed_reference
from . import runtime
from .checks import check_backend, check_floating, check_int, check_tensor
from .runtime import INTERPRET, kernel_op, off_current_device, register_fake, require_triton

__all__ = ["attention", "local_attention_packed", "block_ranges", "resolve_look", "triton_supports"]

LOG2E = 1.4426950408889634


class Tiles(NamedTuple):
    """One kernel's launch shape: BLOCK_M queries x BLOCK_N keys per tile."""

    block_m: int
    block_n: int
    warps: int
    stages: int

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.warps, num_stages=self.stages)


# Launch shapes (forward, dq, dk/dv) for 16-bit inputs; fp32 (ieee dots, twice the bytes per
# tile) halves the forward's query block and its stages to fit shared memory, and dh = 128
# doubles the warps.
FWD_TILES = Tiles(128, 64, 4, 3)
DQ_TILES = Tiles(64, 64, 4, 2)
DKDV_TILES = Tiles(64, 64, 4, 2)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_dtype(dtype: torch.dtype):
    """The dtype dot operands are cast to (after rounding to the input dtype): the input's own,
    except bf16 under the interpreter, whose dot multiplies bf16's uint16 storage as integers
    (triton 3.x): fp32 there, exact for bf16-rounded operands."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


# --------------------------------------------------------------------------------------------
# @triton.jit helpers shared by the three kernels


@triton.jit
def _head_offsets(pid_bh, H, G, R, n_kv, s_qb, s_qh, s_kb, s_kr, s_kg):
    """Program (b, h) -> (b, h, offset of its q rows, offset of its k/v rows, offset of its
    route's [n_kv] masks/scales/positions), int64. Head h reads route h // G, head h % G."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    r = h // G
    return b, h, b * s_qb + h * s_qh, b * s_kb + r * s_kr + (h % G) * s_kg, (b * R + r) * n_kv


@triton.jit
def _kv_range(m0, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL: tl.constexpr, CAUSAL: tl.constexpr,
              EXACT: tl.constexpr, WINDOWED: tl.constexpr, SPAN: tl.constexpr, BLOCK_M: tl.constexpr,
              EVERY: tl.constexpr):
    """[lo, hi): the keys some query m0 .. m0 + BLOCK_M - 1 (< n_q) may see by index; EVERY: the
    keys every one of them may see (empty when lo >= hi; masks and positions aside). Both bounds
    grow with the query: lo comes from lo_row, hi from hi_row (in int64, so a large window
    product cannot wrap)."""
    lo_row = m0.to(tl.int64)
    hi_row = (tl.minimum(m0 + BLOCK_M, n_q) - 1).to(tl.int64)
    if EVERY:
        lo_row, hi_row = hi_row, lo_row
    lo = lo_row * 0
    hi = lo + n_kv
    if LOCAL:
        lo = tl.maximum((lo_row // w - lb) * w, 0)
        hi = tl.minimum((hi_row // w + lf + 1) * w, n_kv)
        if CAUSAL:
            hi = tl.minimum(hi, hi_row + 1)
        if EXACT:
            lo = tl.maximum(lo, lo_row - w * lb)
            if not CAUSAL:
                hi = tl.minimum(hi, hi_row + w * lf + 1)
    if WINDOWED:
        hi = tl.minimum(hi, (hi_row // cq + 1) * ckv)
        if SPAN:
            lo = tl.maximum(lo, (lo_row // cq + 1) * ckv - span)
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _q_range(n0, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL: tl.constexpr, CAUSAL: tl.constexpr,
             EXACT: tl.constexpr, WINDOWED: tl.constexpr, SPAN: tl.constexpr, BLOCK_N: tl.constexpr,
             EVERY: tl.constexpr):
    """[lo, hi): the queries that may see some key n0 .. n0 + BLOCK_N - 1 (< n_kv) by index;
    EVERY: those that may see every one of them."""
    lo_key = n0.to(tl.int64)
    hi_key = (tl.minimum(n0 + BLOCK_N, n_kv) - 1).to(tl.int64)
    if EVERY:
        lo_key, hi_key = hi_key, lo_key
    lo = lo_key * 0
    hi = lo + n_q
    if LOCAL:
        lo = tl.maximum((lo_key // w - lf) * w, 0)
        hi = tl.minimum((hi_key // w + lb + 1) * w, n_q)
        if CAUSAL:
            lo = tl.maximum(lo, lo_key)
        if EXACT:
            hi = tl.minimum(hi, hi_key + w * lb + 1)
            if not CAUSAL:
                lo = tl.maximum(lo, lo_key - w * lf)
    if WINDOWED:
        lo = tl.maximum(lo, (lo_key // ckv) * cq)
        if SPAN:  # the last query window that reaches back to hi_key: (hi_key + span) // ckv - 1
            hi = tl.minimum(hi, ((hi_key + span) // ckv) * cq)
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _visible(qi, kj, q_ok, k_ok, qpos, kpos, w, lb, lf, cq, ckv, span, LOCAL: tl.constexpr,
             CAUSAL: tl.constexpr, EXACT: tl.constexpr, CAUSAL_POS: tl.constexpr,
             WINDOWED: tl.constexpr, SPAN: tl.constexpr):
    """May query qi see key kj? Arguments come shaped to broadcast ([M, 1] and [1, N] or the
    transpose), and so does the answer."""
    vis = q_ok & k_ok
    if LOCAL:
        diff = kj // w - qi // w
        vis = vis & (diff >= -lb) & (diff <= lf)
        if CAUSAL:
            vis = vis & (kj <= qi)
        if EXACT:
            vis = vis & (qi - kj <= w * lb)
            if not CAUSAL:
                vis = vis & (kj - qi <= w * lf)
    if CAUSAL_POS:
        vis = vis & (kpos <= qpos)
    if WINDOWED:
        vis = vis & (kj // ckv <= qi // cq)
        if SPAN:  # kj >= (qi // cq + 1) * ckv - span, in a form without a large product
            vis = vis & ((kj + span) // ckv > qi // cq)
    return vis


@triton.jit
def _load_keys(K, V, KV_SCALE, KV_MASK, KV_POS, kv_off, meta_off, kj, offs_d, s_kj, n_kv, lo, hi, qpos_max,
               qpos_min, full, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL_POS: tl.constexpr,
               SANITIZE: tl.constexpr):
    """Key rows kj [BLOCK_N] of one head -> (k, v, v_eff = v * kv_scale, kv_scale (fp32), ok,
    kpos, full). ok: some query of the block may see the key (in [lo, hi), unmasked, kv_pos <= the
    block's largest q_pos); k, v, v_eff rows are 0 where not ok, whatever memory holds.
    full (a scalar, the tile inside the block's `EVERY` range; SANITIZE only) stays true if every
    key is also unmasked and at a kv_pos <= the block's smallest q_pos: every query of the block
    may see every key, and the kernels skip the masks.
    SANITIZE (for the kernels that contract over keys: p @ v, ds @ k), on tiles that are not
    full: v_eff is also 0 at every entry where k or v_eff is not finite, so that 0 * NaN never
    reaches a query that cannot see the key; k is NaN there (1, the forward: the key's scores
    turn NaN, and so does the output of every query that may see it) or 0 (2, the dq kernel:
    such queries have lse NaN already). A full tile keeps its values: every query sees them.
    One helper per key block: under the interpreter every @triton.jit call costs ~0.2 ms."""
    ok = (kj >= lo) & (kj < hi)
    if HAS_MASK:
        unmasked = tl.load(KV_MASK + meta_off + kj, mask=ok, other=0) != 0
        ok = ok & unmasked
        if SANITIZE:
            full = full & (tl.min(unmasked.to(tl.int32), axis=0) > 0)
    kpos = kj
    if CAUSAL_POS:
        kpos = tl.load(KV_POS + meta_off + kj, mask=ok, other=0)
        if SANITIZE:
            full = full & (tl.max(kpos, axis=0) <= qpos_min)
        ok = ok & (kpos <= qpos_max)
    ptr = kv_off + kj[:, None] * s_kj + offs_d[None, :]
    k_in = (kj < n_kv)[:, None]
    k = tl.load(K + ptr, mask=k_in, other=0.0)
    v = tl.load(V + ptr, mask=k_in, other=0.0)
    sc = tl.full(kj.shape, 1.0, tl.float32)
    if HAS_SCALE:
        sc = tl.load(KV_SCALE + meta_off + kj, mask=ok, other=0.0).to(tl.float32)
    if SANITIZE:
        v_eff = v
        if HAS_SCALE:
            v_eff = (v.to(tl.float32) * sc[:, None]).to(v.dtype)
        if not full:
            fin = (tl.abs(k) < float("inf")) & (tl.abs(v_eff) < float("inf"))
            keep = ok[:, None] & fin
            v_eff = tl.where(keep, v_eff, tl.zeros_like(v_eff))
            if SANITIZE == 1:
                k = tl.where(ok[:, None], tl.where(fin, k, float("nan")), tl.zeros_like(k))
            else:
                k = tl.where(keep, k, tl.zeros_like(k))
        v = v_eff  # the raw v is not needed where keys are sanitized
    else:
        k = tl.where(ok[:, None], k, tl.zeros_like(k))
        v = tl.where(ok[:, None], v, tl.zeros_like(v))
        v_eff = v
        if HAS_SCALE:
            v_eff = (v.to(tl.float32) * sc[:, None]).to(v.dtype)
    return k, v, v_eff, sc, ok, kpos, full


@triton.jit
def _load_null(NULL, h, H, offs_d, HEAD_DIM: tl.constexpr):
    """null_k[h], null_v[h] in fp32 from a contiguous [2, H, HEAD_DIM] tensor."""
    nk = tl.load(NULL + h * HEAD_DIM + offs_d).to(tl.float32)
    nv = tl.load(NULL + (H + h) * HEAD_DIM + offs_d).to(tl.float32)
    return nk, nv


@triton.jit
def _load_q_meta(Q_POS, b, n_q, offs_m, q_ok, CAUSAL_POS: tl.constexpr):
    """(positions of the rows, the largest and the smallest position of the block's real rows)."""
    qpos = offs_m
    qpos_max = n_q * 0
    qpos_min = qpos_max
    if CAUSAL_POS:
        qpos = tl.load(Q_POS + b * n_q + offs_m, mask=q_ok, other=0)
        qpos_max = tl.max(tl.where(q_ok, qpos, -4611686018427387904), axis=0)
        qpos_min = tl.min(tl.where(q_ok, qpos, 4611686018427387904), axis=0)
    return qpos, qpos_max, qpos_min


@triton.jit
def _ranges_kernel(OUT, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL: tl.constexpr, CAUSAL: tl.constexpr,
                   EXACT: tl.constexpr, WINDOWED: tl.constexpr, SPAN: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, FOR_KEYS: tl.constexpr, EVERY: tl.constexpr):
    """Test hook: OUT[block] = [lo, hi) of `_kv_range` per query block (FOR_KEYS: of `_q_range`
    per key block), the bounds the kernels loop over (EVERY: those of the unmasked tiles)."""
    pid = tl.program_id(0)
    if FOR_KEYS:
        lo, hi = _q_range(pid * BLOCK_N, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, WINDOWED, SPAN,
                          BLOCK_N, EVERY)
    else:
        lo, hi = _kv_range(pid * BLOCK_M, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, WINDOWED, SPAN,
                           BLOCK_M, EVERY)
    tl.store(OUT + 2 * pid, lo)
    tl.store(OUT + 2 * pid + 1, hi)


# --------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, NULL, KV_SCALE, KV_MASK, Q_POS, KV_POS, O, LSE,
    s_qb, s_qi, s_qh, s_kb, s_kr, s_kj, s_kg, s_ob, s_oi, s_oh,
    n_q, n_kv, H, G, R, qk_scale, w, lb, lf, cq, ckv, span,
    HAS_NULL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL_POS: tl.constexpr, WINDOWED: tl.constexpr, SPAN: tl.constexpr, LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr, EXACT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_off, kv_off, meta_off = _head_offsets(pid_bh, H, G, R, n_kv, s_qb, s_qh, s_kb, s_kr, s_kg)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ok = offs_m < n_q
    q = tl.load(Q + q_off + offs_m[:, None] * s_qi + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    q_bad = tl.max(tl.where(tl.abs(q) < float("inf"), 0, 1), axis=1) > 0  # a non-finite q: NaN out
    qpos, qpos_max, qpos_min = _load_q_meta(Q_POS, b, n_q, offs_m, q_ok, CAUSAL_POS)
    lo, hi = _kv_range(m0, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, WINDOWED, SPAN, BLOCK_M, False)
    every_lo, every_hi = _kv_range(m0, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, WINDOWED, SPAN,
                                   BLOCK_M, True)

    if HAS_NULL:  # the null key/value is the online softmax's initial state
        nk, nv = _load_null(NULL, h, H, offs_d, HEAD_DIM)
        m_i = tl.sum(q.to(tl.float32) * nk[None, :], axis=1) * qk_scale
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32) + nv[None, :]
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        full = (start_n >= every_lo) & (start_n + BLOCK_N <= every_hi)
        k, _v, v_eff, _sc, k_ok, kpos, full = _load_keys(K, V, KV_SCALE, KV_MASK, KV_POS, kv_off, meta_off, offs_n,
                                                         offs_d, s_kj, n_kv, lo, hi, qpos_max, qpos_min, full,
                                                         HAS_SCALE, HAS_MASK, CAUSAL_POS, 1)
        s = tl.dot(q.to(DOT), tl.trans(k).to(DOT), input_precision=PRECISION) * qk_scale
        if full:  # every pair visible; an infinite k's -inf score must mark the row as a NaN one does
            s = tl.where(s == float("-inf"), float("nan"), s)
        else:
            vis = _visible(offs_m[:, None], offs_n[None, :], q_ok[:, None], k_ok[None, :], qpos[:, None],
                           kpos[None, :], w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, CAUSAL_POS, WINDOWED, SPAN)
            # NaN scores (a non-finite k or value) stay where visible: they turn l_i NaN below.
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no NaN from -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_eff.dtype).to(DOT), v_eff.to(DOT), input_precision=PRECISION)
        m_i = m_new

    # l_i is NaN (or inf) once a visible score was NaN or +inf (exp2(NaN) and inf - inf are NaN,
    # and NaN survives every later rescale), never otherwise: it is at most 1 + n_kv. A full
    # tile's non-finite value (kept: every query sees it) makes acc non-finite instead.
    acc_bad = tl.max(tl.where(tl.abs(acc) < float("inf"), 0, 1), axis=1) > 0
    poisoned = q_bad | ~(l_i < float("inf")) | acc_bad
    seen = l_i > 0.0
    l_safe = tl.where(seen & ~poisoned, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    out = tl.where(poisoned[:, None], float("nan"), out)
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))
    lse = tl.where(poisoned, float("nan"), lse)  # the backward's mark: this row takes no part
    o_ptr = O + b * s_ob + h * s_oh + offs_m[:, None] * s_oi + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=q_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, NULL, KV_SCALE, KV_MASK, Q_POS, KV_POS, O, DO, LSE, DELTA, DQ, DNULL,
    s_qb, s_qi, s_qh, s_kb, s_kr, s_kj, s_kg, s_ob, s_oi, s_oh, s_dob, s_doi, s_doh,
    s_dqb, s_dqi, s_dqh,
    n_q, n_kv, H, G, R, sm_scale, qk_scale, w, lb, lf, cq, ckv, span,
    HAS_NULL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL_POS: tl.constexpr, WINDOWED: tl.constexpr, SPAN: tl.constexpr, LOCAL: tl.constexpr,
    CAUSAL: tl.constexpr, EXACT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_off, kv_off, meta_off = _head_offsets(pid_bh, H, G, R, n_kv, s_qb, s_qh, s_kb, s_kr, s_kg)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ok = offs_m < n_q
    row = offs_m[:, None]
    q = tl.load(Q + q_off + row * s_qi + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + row * s_doi + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    o = tl.load(O + b * s_ob + h * s_oh + row * s_oi + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    stat = pid_bh.to(tl.int64) * n_q + offs_m
    tl.store(DELTA + stat, delta, mask=q_ok)
    lse = tl.load(LSE + stat, mask=q_ok, other=float("inf"))
    # Live rows take part in the backward: those whose output is not NaN (lse NaN marks it; a
    # live row's q, o and lse are finite). The others pass back nothing, whatever they hold.
    live = q_ok & (lse == lse)
    qpos, qpos_max, qpos_min = _load_q_meta(Q_POS, b, n_q, offs_m, q_ok, CAUSAL_POS)
    lo, hi = _kv_range(m0, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, WINDOWED, SPAN, BLOCK_M, False)
    every_lo, every_hi = _kv_range(m0, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, WINDOWED, SPAN,
                                   BLOCK_M, True)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        full = (start_n >= every_lo) & (start_n + BLOCK_N <= every_hi)
        k, _v, v_eff, _sc, k_ok, kpos, full = _load_keys(K, V, KV_SCALE, KV_MASK, KV_POS, kv_off, meta_off, offs_n,
                                                         offs_d, s_kj, n_kv, lo, hi, qpos_max, qpos_min, full,
                                                         HAS_SCALE, HAS_MASK, CAUSAL_POS, 2)
        s = tl.dot(q.to(DOT), tl.trans(k).to(DOT), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do.to(DOT), tl.trans(v_eff).to(DOT), input_precision=PRECISION)
        if full:  # a live row sees only finite keys; the others' rows are dropped below
            ds = p * (dp - delta[:, None])
        else:
            vis = _visible(offs_m[:, None], offs_n[None, :], q_ok[:, None], k_ok[None, :], qpos[:, None],
                           kpos[None, :], w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, CAUSAL_POS, WINDOWED, SPAN)
            p = tl.where(vis, p, 0.0)
            ds = tl.where(vis, p * (dp - delta[:, None]), 0.0)
        dq += tl.dot(ds.to(k.dtype).to(DOT), k.to(DOT), input_precision=PRECISION)

    if HAS_NULL:
        nk, nv = _load_null(NULL, h, H, offs_d, HEAD_DIM)
        qf = tl.where(live[:, None], q.to(tl.float32), 0.0)
        dof = tl.where(live[:, None], do.to(tl.float32), 0.0)
        p0 = tl.exp2(tl.sum(qf * nk[None, :], axis=1) * qk_scale - lse)
        p0 = tl.where(live, p0, 0.0)
        ds0 = tl.where(live, p0 * (tl.sum(dof * nv[None, :], axis=1) - delta), 0.0)
        dq += ds0[:, None] * nk[None, :]
        # per-(batch, query block) partial sums, reduced by torch: [b * blocks, 2, H, HEAD_DIM]
        part = ((b * tl.num_programs(0) + pid_m) * 2 * H + h) * HEAD_DIM + offs_d
        tl.store(DNULL + part, tl.sum(ds0[:, None] * qf, axis=0) * sm_scale)
        tl.store(DNULL + part + H * HEAD_DIM, tl.sum(p0[:, None] * dof, axis=0))

    dq = tl.where(live[:, None], dq * sm_scale, 0.0)
    tl.store(DQ + b * s_dqb + h * s_dqh + row * s_dqi + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_ok[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, KV_SCALE, KV_MASK, Q_POS, KV_POS, DO, LSE, DELTA, DK, DV, DSCALE,
    s_qb, s_qi, s_qh, s_kb, s_kr, s_kj, s_kg, s_dob, s_doi, s_doh, s_dkb, s_dkr, s_dkj, s_dkg,
    n_q, n_kv, H, G, R, sm_scale, qk_scale, w, lb, lf, cq, ckv, span,
    HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL_POS: tl.constexpr,
    WINDOWED: tl.constexpr, SPAN: tl.constexpr, LOCAL: tl.constexpr, CAUSAL: tl.constexpr,
    EXACT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_off, kv_off, meta_off = _head_offsets(pid_bh, H, G, R, n_kv, s_qb, s_qh, s_kb, s_kr, s_kg)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_in = offs_n < n_kv
    k, v, v_eff, sc, k_ok, kpos, _full = _load_keys(K, V, KV_SCALE, KV_MASK, KV_POS, kv_off, meta_off, offs_n, offs_d,
                                                    s_kj, n_kv, 0, n_kv, 4611686018427387904, 0, False, HAS_SCALE,
                                                    HAS_MASK, CAUSAL_POS, 0)
    kpos_max = n_kv * 0
    if CAUSAL_POS:
        kpos_max = tl.max(tl.where(k_ok, kpos, -4611686018427387904), axis=0)  # of the keys that count
    lo, hi = _q_range(n0, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, WINDOWED, SPAN, BLOCK_N, False)
    every_lo, every_hi = _q_range(n0, n_q, n_kv, w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, WINDOWED, SPAN,
                                  BLOCK_N, True)

    # Transposed tiles ([keys, queries]): the dots then need no transposed accumulators.
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)  # gradient of v * kv_scale
    for start_m in range((lo // BLOCK_M) * BLOCK_M, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_in = offs_m < n_q
        stat = pid_bh.to(tl.int64) * n_q + offs_m
        lse = tl.load(LSE + stat, mask=q_in, other=float("inf"))
        q_ok = q_in & (lse == lse)  # live rows, as in the dq kernel
        q = tl.load(Q + q_off + offs_m[:, None] * s_qi + offs_d[None, :], mask=q_in[:, None], other=0.0)
        do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_doi + offs_d[None, :],
                     mask=q_in[:, None], other=0.0)
        # Rows that are not live may hold NaN in q or do: zeroed, as their p and ds are, so that
        # no 0 * NaN reaches dk or dv through the dots over queries.
        q = tl.where(q_ok[:, None], q, tl.zeros_like(q))
        do = tl.where(q_ok[:, None], do, tl.zeros_like(do))
        delta = tl.load(DELTA + stat, mask=q_ok, other=0.0)
        qpos, _qmax, qpos_min = _load_q_meta(Q_POS, b, n_q, offs_m, q_in, CAUSAL_POS)
        # Every live query of a full tile sees every key of the block (keys that are not ok are
        # dropped at the end): only the rows that are not live need selecting away.
        full = (start_m >= every_lo) & (start_m + BLOCK_M <= every_hi)
        if CAUSAL_POS:
            full = full & (kpos_max <= qpos_min)
        s_t = tl.dot(k.to(DOT), tl.trans(q).to(DOT), input_precision=PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        dp_t = tl.dot(v_eff.to(DOT), tl.trans(do).to(DOT), input_precision=PRECISION)
        if full:
            p_t = tl.where(q_ok[None, :], p_t, 0.0)
            ds_t = tl.where(q_ok[None, :], p_t * (dp_t - delta[None, :]), 0.0)
        else:
            vis_t = _visible(offs_m[None, :], offs_n[:, None], q_ok[None, :], k_ok[:, None], qpos[None, :],
                             kpos[:, None], w, lb, lf, cq, ckv, span, LOCAL, CAUSAL, EXACT, CAUSAL_POS, WINDOWED,
                             SPAN)
            p_t = tl.where(vis_t, p_t, 0.0)
            ds_t = tl.where(vis_t, p_t * (dp_t - delta[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype).to(DOT), do.to(DOT), input_precision=PRECISION)
        dk += tl.dot(ds_t.to(q.dtype).to(DOT), q.to(DOT), input_precision=PRECISION)

    if HAS_SCALE:
        # A key no query saw has dv == 0 exactly; its raw v or scale may be NaN/inf (say, past
        # every query's position), so select instead of multiplying 0 by it.
        unseen = dv == 0.0
        # d kv_scale of this head (summed over the route's heads by torch)
        dsc = tl.sum(tl.where(unseen, 0.0, dv * v.to(tl.float32)), axis=1)
        tl.store(DSCALE + pid_bh.to(tl.int64) * n_kv + offs_n, tl.where(k_ok, dsc, 0.0), mask=k_in)
        dv = tl.where(unseen, 0.0, dv * sc[:, None])
    dk = tl.where(k_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(k_ok[:, None], dv, 0.0)
    _, _, _, dkv_off, _ = _head_offsets(pid_bh, H, G, R, n_kv, 0, 0, s_dkb, s_dkr, s_dkg)
    ptr = dkv_off + offs_n[:, None] * s_dkj + offs_d[None, :]
    tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=k_in[:, None])
    tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=k_in[:, None])


# --------------------------------------------------------------------------------------------
# launchers


def _layout(q: Tensor, kv: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Views of the op's inputs: q [b, i, h, dh], k and v [b, r, j, g, dh]. kv None: q is a
    packed qkv [b, n, 3, h, dh] (one route of all h heads)."""
    if kv is None:
        return q.select(2, 0), q.select(2, 1).unsqueeze(1), q.select(2, 2).unsqueeze(1)
    return q, kv.select(3, 0), kv.select(3, 1)


def _configs(dtype: torch.dtype, dh: int) -> tuple[Tiles, Tiles, Tiles]:
    """The (forward, dq, dk/dv) launch shapes (tests replace this function to force small tiles)."""
    tiles = [FWD_TILES, DQ_TILES, DKDV_TILES]
    if dtype == torch.float32:
        tiles[0] = tiles[0]._replace(block_m=min(tiles[0].block_m, 64), stages=min(tiles[0].stages, 2))
    if dh >= 128:
        tiles = [t._replace(warps=max(t.warps, 8)) for t in tiles]
    return tiles[0], tiles[1], tiles[2]


class _Plan:
    """Everything the three kernels share, derived once from the op's arguments."""

    def __init__(self, q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, scale, q_window, kv_window, kv_span,
                 look_backward, look_forward, causal, exact):
        self.local = kv is None
        if q.stride(-1) != 1:
            q = q.contiguous()
        if kv is not None and kv.stride(-1) != 1:
            kv = kv.contiguous()
        self.q, self.kv = q, kv
        self.qv, self.k, self.v = _layout(q, kv)
        self.b, self.n_q, self.H, self.D = self.qv.shape
        self.R, self.n_kv, self.G = self.k.shape[1], self.k.shape[2], self.k.shape[3]
        dummy = q
        self.null = null_kv.contiguous() if null_kv is not None else dummy
        self.scale_t = kv_scale.contiguous() if kv_scale is not None else dummy
        self.mask = kv_mask.contiguous().view(torch.uint8) if kv_mask is not None else dummy
        # int64: the kernels compare positions with +-2^62 sentinels
        self.q_pos = q_pos.contiguous().long() if q_pos is not None else dummy
        self.kv_pos = kv_pos.contiguous().long() if kv_pos is not None else dummy
        self.sm_scale = float(scale)
        self.qk_scale = float(scale) * LOG2E
        if self.local:
            # Same visibility with every product bounded by ~2n: a window past n is n, and no
            # more windows can be looked at than there are.
            n = self.n_q
            w = min(q_window, n)
            windows = -(-n // w)
            self.ints = (w, min(look_backward, windows), min(look_forward, windows), 1, 1, 0)
        else:
            self.ints = (1, 0, 0, max(q_window, 1), max(kv_window, 1), kv_span)
        self.flags = dict(
            HAS_SCALE=kv_scale is not None, HAS_MASK=kv_mask is not None,
            CAUSAL_POS=(not self.local) and q_pos is not None,
            WINDOWED=(not self.local) and q_window > 0, SPAN=(not self.local) and q_window > 0 and kv_span > 0,
            LOCAL=self.local, CAUSAL=self.local and bool(causal), EXACT=self.local and bool(exact),
            HEAD_DIM=self.D, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            DOT=_dot_dtype(q.dtype),
        )
        self.has_null = null_kv is not None
        self.fwd, self.dq, self.dkdv = _configs(q.dtype, self.D)

    def sizes(self) -> tuple:
        return (self.n_q, self.n_kv, self.H, self.G, self.R)


def _empty(shape, like: Tensor, dtype=None) -> Tensor:
    return runtime.empty(shape, dtype=dtype or like.dtype, device=like.device)


def attention_fwd(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, scale, q_window, kv_window, kv_span,
                  look_backward, look_forward, causal, exact) -> tuple[Tensor, Tensor]:
    """-> (o [b, i, h, dh] contiguous in q's dtype, lse [b, h, i] fp32, base 2). No checks."""
    if off_current_device(q):  # Triton launches on the current device
        with torch.cuda.device(q.device):
            return attention_fwd(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, scale, q_window,
                                 kv_window, kv_span, look_backward, look_forward, causal, exact)
    p = _Plan(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, scale, q_window, kv_window, kv_span,
              look_backward, look_forward, causal, exact)
    o = _empty((p.b, p.n_q, p.H, p.D), q)
    lse = _empty((p.b, p.H, p.n_q), q, torch.float32)
    _attn_fwd_kernel[(triton.cdiv(p.n_q, p.fwd.block_m), p.b * p.H)](
        p.qv, p.k, p.v, p.null, p.scale_t, p.mask, p.q_pos, p.kv_pos, o, lse,
        *p.qv.stride()[:3], *p.k.stride()[:4], *o.stride()[:3],
        *p.sizes(), p.qk_scale, *p.ints,
        HAS_NULL=p.has_null, **p.flags, **p.fwd.meta(),
    )
    return o, lse


def attention_bwd(do, q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, o, lse, scale, q_window,
                  kv_window, kv_span, look_backward, look_forward, causal,
                  exact) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dkv, dnull_kv, dkv_scale); kv None (packed qkv): dq is dqkv and dkv is empty.
    Absent optional inputs get empty gradients. Two launches plus torch sums of partials."""
    if off_current_device(q):
        with torch.cuda.device(q.device):
            return attention_bwd(do, q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, o, lse, scale,
                                 q_window, kv_window, kv_span, look_backward, look_forward, causal, exact)
    p = _Plan(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, scale, q_window, kv_window, kv_span,
              look_backward, look_forward, causal, exact)
    if do.stride(-1) != 1:
        do = do.contiguous()
    def none() -> Tensor:  # a fresh one each time: a custom op's outputs may not alias
        return q.new_empty((0,))

    if p.local:
        dq_full = _empty(p.q.shape, q)  # dq and dk/dv go straight into their slices of one buffer
        dq, dk, dv = _layout(dq_full, None)
        dkv = none()
    else:
        dq_full = dq = _empty((p.b, p.n_q, p.H, p.D), q)
        dkv = _empty(p.kv.shape, kv)
        _, dk, dv = _layout(dq, dkv)
    n_mblocks = triton.cdiv(p.n_q, p.dq.block_m)
    delta = _empty((p.b, p.H, p.n_q), q, torch.float32)
    dnull_part = _empty((p.b * n_mblocks, 2, p.H, p.D), q, torch.float32) if p.has_null else q
    dscale_part = _empty((p.b, p.H, p.n_kv), q, torch.float32) if kv_scale is not None else q
    common = (*p.sizes(), p.sm_scale, p.qk_scale, *p.ints)
    _attn_bwd_dq_kernel[(n_mblocks, p.b * p.H)](
        p.qv, p.k, p.v, p.null, p.scale_t, p.mask, p.q_pos, p.kv_pos, o, do, lse, delta, dq, dnull_part,
        *p.qv.stride()[:3], *p.k.stride()[:4], *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        *common, HAS_NULL=p.has_null, **p.flags, **p.dq.meta(),
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(p.n_kv, p.dkdv.block_n), p.b * p.H)](
        p.qv, p.k, p.v, p.scale_t, p.mask, p.q_pos, p.kv_pos, do, lse, delta, dk, dv, dscale_part,
        *p.qv.stride()[:3], *p.k.stride()[:4], *do.stride()[:3], *dk.stride()[:4],
        *common, **p.flags, **p.dkdv.meta(),
    )
    dnull = dnull_part.sum(0).to(null_kv.dtype) if p.has_null else none()
    dscale = dscale_part.view(p.b, p.R, p.G, p.n_kv).sum(2).to(kv_scale.dtype) if kv_scale is not None else none()
    return dq_full, dkv, dnull, dscale


def block_ranges(n_q: int, n_kv: int, *, block_m: int, block_n: int, for_keys: bool = False, every: bool = False,
                 window: tuple[int, int, int, bool, bool] | None = None,
                 window_slots: tuple[int, int] | None = None, kv_span: int | None = None,
                 device: str | torch.device = "cpu") -> Tensor:
    """int32 [blocks, 2]: the [lo, hi) the kernels compute for each query block (for_keys: the
    query range of each key block); every: the range each row (column) of the block may see
    whole, where tiles go unmasked. window = (w, look_backward, look_forward, causal, exact)
    for the local mode, window_slots = (Cq, Ckv) for the heavy windowed mode, with kv_span
    optionally. For tests."""
    blocks = triton.cdiv(n_kv if for_keys else n_q, block_n if for_keys else block_m)
    out = runtime.empty((blocks, 2), dtype=torch.int32, device=device)
    w, lb, lf, causal, exact = window if window is not None else (1, 0, 0, False, False)
    cq, ckv = window_slots if window_slots is not None else (1, 1)
    _ranges_kernel[(blocks,)](
        out, n_q, n_kv, w, lb, lf, cq, ckv, kv_span or 0, LOCAL=window is not None, CAUSAL=bool(causal),
        EXACT=bool(exact), WINDOWED=window_slots is not None, SPAN=window_slots is not None and kv_span is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, FOR_KEYS=for_keys, EVERY=every,
    )
    return out


# --------------------------------------------------------------------------------------------
# torch.library ops: the same op eagerly and under torch.compile

@kernel_op("colt5::attention_fwd")
def _fwd_op(q: Tensor, kv: Tensor | None, null_kv: Tensor | None, kv_scale: Tensor | None, kv_mask: Tensor | None,
            q_pos: Tensor | None, kv_pos: Tensor | None, scale: float, q_window: int, kv_window: int, kv_span: int,
            look_backward: int, look_forward: int, causal: bool, exact: bool) -> tuple[Tensor, Tensor]:
    return attention_fwd(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, scale, q_window, kv_window, kv_span,
                         look_backward, look_forward, causal, exact)


def _fake_out(q: Tensor, kv: Tensor | None) -> tuple[Tensor, Tensor]:
    if kv is None:
        b, n, _, h, dh = q.shape
    else:
        b, n, h, dh = q.shape
    return q.new_empty((b, n, h, dh)), q.new_empty((b, h, n), dtype=torch.float32)


@register_fake(_fwd_op)
def _(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, scale, q_window, kv_window, kv_span, look_backward,
      look_forward, causal, exact):
    return _fake_out(q, kv)


@kernel_op("colt5::attention_bwd")
def _bwd_op(do: Tensor, q: Tensor, kv: Tensor | None, null_kv: Tensor | None, kv_scale: Tensor | None,
            kv_mask: Tensor | None, q_pos: Tensor | None, kv_pos: Tensor | None, scale: float, q_window: int,
            kv_window: int, kv_span: int, look_backward: int, look_forward: int, causal: bool, exact: bool,
            o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return attention_bwd(do, q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, o, lse, scale, q_window,
                         kv_window, kv_span, look_backward, look_forward, causal, exact)


@register_fake(_bwd_op)
def _(do, q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, scale, q_window, kv_window, kv_span, look_backward,
      look_forward, causal, exact, o, lse):
    def maybe(t: Tensor | None) -> Tensor:
        return q.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    if kv is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((0,)), maybe(null_kv), maybe(kv_scale)
    return torch.empty_like(o), maybe(kv), maybe(null_kv), maybe(kv_scale)


def _setup_context(ctx, inputs, output):
    q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, *scalars = inputs
    ctx.save_for_backward(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, *output)
    ctx.scalars = scalars
    ctx.present = (kv is not None, null_kv is not None, kv_scale is not None)


def _backward(ctx, do, _dlse):
    q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, o, lse = ctx.saved_tensors
    dq, dkv, dnull, dscale = _bwd_op(do, q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, *ctx.scalars, o, lse)
    has_kv, has_null, has_scale = ctx.present
    return (dq, dkv if has_kv else None, dnull if has_null else None, dscale if has_scale else None,
            *([None] * (3 + len(ctx.scalars))))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# argument checks (public boundary)


def resolve_look(causal: bool, look_backward: int, look_forward: int | None) -> tuple[int, int]:
    """Checked (look_backward, look_forward); look_forward defaults to 0 if causal else 1."""
    look_backward = check_int("look_backward", look_backward, 0)
    if look_forward is None:
        look_forward = 0 if causal else 1
    look_forward = check_int("look_forward", look_forward, 0)
    if causal and look_forward > 0:
        raise ValueError(f"look_forward must be 0 when causal=True, got {look_forward}")
    return look_backward, look_forward


def _check_scale(scale) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def triton_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """The kernels take this dtype and head dim (fp16/bf16/fp32; a power of two in 16..128)."""
    return dtype in _KERNEL_DTYPES and 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0


def _use_triton(backend: str | None, t: Tensor, head_dim: int, name: str) -> bool:
    if backend == "reference":
        return False
    if backend == "triton":
        require_triton(t, name)
        if not triton_supports(t.dtype, head_dim):
            raise ValueError(
                f"{name}(backend='triton') needs fp16/bf16/fp32 inputs and a head dim that is a power of two "
                f"in 16..128, got {t.dtype} and {head_dim}"
            )
        return True
    return t.is_cuda and triton_supports(t.dtype, head_dim)


def _check_attention_args(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, q_window_slots, kv_window_slots, kv_span):
    check_tensor("q", q, None, "")
    if q.dim() != 4:
        raise ValueError(f"q must be [b, i, h, dh], got shape {tuple(q.shape)}")
    check_floating("q", q)
    check_tensor("kv", kv, None, "")
    b, i, h, dh = q.shape
    if kv.dim() != 6 or kv.shape[0] != b or kv.shape[3] != 2 or kv.shape[5] != dh:
        raise ValueError(f"kv must be [b={b}, r, j, 2, g, dh={dh}], got shape {tuple(kv.shape)}")
    r, j, g = kv.shape[1], kv.shape[2], kv.shape[4]
    if r * g != h:
        raise ValueError(f"kv: routes r={r} times heads per route g={g} must equal q's heads h={h}")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv must have q's dtype {q.dtype}, got {kv.dtype}")
    if kv.device != q.device:
        raise ValueError(f"kv is on {kv.device} but q is on {q.device}")
    if null_kv is not None:
        check_tensor("null_kv", null_kv, (2, h, dh), "[2, h, dh]", q.device)
        check_floating("null_kv", null_kv)
    if kv_scale is not None:
        check_tensor("kv_scale", kv_scale, (b, r, j), "[b, r, j]", q.device)
        check_floating("kv_scale", kv_scale)
    if kv_mask is not None:
        check_tensor("kv_mask", kv_mask, (b, r, j), "[b, r, j]", q.device)
        if kv_mask.dtype != torch.bool:
            raise TypeError(f"kv_mask must be bool (True = may be attended), got {kv_mask.dtype}")
    if (q_pos is None) != (kv_pos is None):
        raise ValueError("q_pos and kv_pos must be given together (causal by position) or not at all")
    if q_pos is not None:
        check_tensor("q_pos", q_pos, (b, i), "[b, i]", q.device)
        check_tensor("kv_pos", kv_pos, (b, r, j), "[b, r, j]", q.device)
        for name, t in (("q_pos", q_pos), ("kv_pos", kv_pos)):
            if t.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{name} must be int64 (or int32), got {t.dtype}")
    if (q_window_slots is None) != (kv_window_slots is None):
        raise ValueError("q_window_slots and kv_window_slots must be given together or not at all")
    if q_window_slots is not None:
        check_int("q_window_slots", q_window_slots, 1)
        check_int("kv_window_slots", kv_window_slots, 1)
        if q_pos is None:
            raise ValueError("q_window_slots / kv_window_slots need q_pos and kv_pos (they refine causal attention)")
    if kv_span is not None:
        check_int("kv_span", kv_span, 1)
        if q_window_slots is None:
            raise ValueError("kv_span needs q_window_slots and kv_window_slots (it counts key slots back from a "
                             "window's end)")


def _effective_span(kv_span: int | None, i: int, j: int, q_window_slots: int | None,
                    kv_window_slots: int | None) -> int | None:
    """kv_span, or None where it restricts nothing: it reaches back past slot 0 from the end of
    the last query window. What is left fits the kernels' int32 arithmetic (j + span)."""
    if kv_span is None or kv_span >= -(-i // q_window_slots) * kv_window_slots:
        return None
    if j + kv_span >= 2**31:
        raise ValueError(f"kv_span={kv_span} with {j} key slots is past the kernels' int32 range")
    return kv_span


# --------------------------------------------------------------------------------------------
# public functions


def attention(
    q: Tensor,
    kv: Tensor,
    *,
    scale: float | None = None,
    null_kv: Tensor | None = None,
    kv_scale: Tensor | None = None,
    kv_mask: Tensor | None = None,
    q_pos: Tensor | None = None,
    kv_pos: Tensor | None = None,
    q_window_slots: int | None = None,
    kv_window_slots: int | None = None,
    kv_span: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Heavy (routed) attention: every query attends to the visible keys of its head's route
    and, when given, to a learned null key/value that is always visible.

    Args:
        q: [b, i, h, dh], fp16/bf16/fp32 (fp64 on the reference), any strides.
        kv: [b, r, j, 2, g, dh], q's dtype, h = r * g: kv[:, r, :, 0] / kv[:, r, :, 1] are the
            keys / values of heads r*g .. r*g+g-1 (each head its own). Read through strides.
        scale: softmax scale, default dh ** -0.5.
        null_kv: [2, h, dh] floating or None: null key and value per head.
        kv_scale: [b, r, j] floating or None: multiplies each value (gets a gradient).
        kv_mask: [b, r, j] bool or None, True = may be attended.
        q_pos [b, i], kv_pos [b, r, j]: int64 (or int32) original positions, together or not at
            all: causal, key j visible to query i only if kv_pos <= q_pos.
        q_window_slots, kv_window_slots: with positions, slots are in window order (query slot
            i in window i // q_window_slots, key slot j in j // kv_window_slots) and keys of a
            later window are never visible; key blocks past a query block's window are skipped.
        kv_span: int >= 1 or None, with window slots only: query slot i sees only the kv_span
            most recent key slots up to the end of its window, j >= (i // Cq + 1) * Ckv -
            kv_span (besides kv_pos <= q_pos); the kernels skip the key blocks before them.
        backend: None (Triton for CUDA tensors whose dtype and dh the kernels take, else the
            reference), "triton" (also CPU tensors under TRITON_INTERPRET=1) or "reference".

    Returns o [b, i, h, dh] contiguous in q's dtype; a query with nothing visible gets zeros.
    Differentiable in q, kv (one gradient in kv's layout), null_kv and kv_scale.

    Non-finite values: a query whose q holds a NaN or inf, or that may see a key whose k or
    value times kv_scale holds one, outputs NaN and passes no gradient back (a constant);
    nothing a query may not see (masked, later, outside its span) reaches its output or any
    gradient it passes back. A query whose cotangent is all zero passes back nothing either.

    Raises TypeError / ValueError naming the argument; ValueError for backend="triton" with a
    dtype or head dim the kernels do not take; RuntimeError for backend="triton" on a CPU
    tensor without the interpreter.
    """
    _check_attention_args(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, q_window_slots, kv_window_slots, kv_span)
    scale = _check_scale(scale)
    check_backend(backend)
    b, i, h, dh = q.shape
    kv_span = _effective_span(kv_span, i, kv.shape[2], q_window_slots, kv_window_slots)
    scale = dh**-0.5 if scale is None else scale
    if _use_triton(backend, q, dh, "attention") and b * i * kv.shape[2] > 0:
        o, _ = _fwd_op(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos, scale, q_window_slots or 0,
                       kv_window_slots or 0, kv_span or 0, 0, 0, q_pos is not None, False)
        return o
    # The reference also covers the empty cases (j = 0 with a null: every query gets null_v).
    return attention_reference(
        q, kv, scale=scale, null_kv=null_kv, kv_scale=kv_scale, kv_mask=kv_mask, q_pos=q_pos,
        kv_pos=kv_pos, q_window_slots=q_window_slots, kv_window_slots=kv_window_slots, kv_span=kv_span,
    )


def local_attention_packed(
    qkv: Tensor,
    *,
    window_size: int,
    causal: bool = False,
    look_backward: int = 1,
    look_forward: int | None = None,
    mask: Tensor | None = None,
    scale: float | None = None,
    exact_windowsize: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Local windowed attention on the packed projection output, with the semantics of
    `colt5.local_attention.local_attention_reference` (see that module's docstring).

    Args:
        qkv: [b, n, 3, h, dh]: q = qkv[:, :, 0], k = qkv[:, :, 1], v = qkv[:, :, 2]; fp16/bf16/
            fp32 (fp64 on the reference); read through strides.
        window_size >= 1: windows of that many tokens from position 0. look_backward >= 0;
            look_forward >= 0, default 0 if causal else 1 (must be 0 when causal).
        causal: key <= query. exact_windowsize: query - key <= w * look_backward (and, not
            causal, key - query <= w * look_forward).
        mask: [b, n] bool or None, True = real token; masks KEYS only.
        scale: default dh ** -0.5. backend: as in `attention`.

    Returns [b, n, h, dh] contiguous in qkv's dtype; queries with no visible key get zeros. Its
    gradient is one tensor in qkv's layout. Non-finite values as in `attention`: a query whose
    q, or a visible key's k or v, is not finite outputs NaN; nothing invisible reaches anything.

    Raises TypeError / ValueError naming the argument (and as `attention` for the backend).
    """
    check_tensor("qkv", qkv, None, "")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [b, n, 3, h, dh], got shape {tuple(qkv.shape)}")
    check_floating("qkv", qkv)
    b, n, _, h, dh = qkv.shape
    window_size = check_int("window_size", window_size, 1)
    causal, exact_windowsize = bool(causal), bool(exact_windowsize)
    look_backward, look_forward = resolve_look(causal, look_backward, look_forward)
    if mask is not None:
        check_tensor("mask", mask, (b, n), "[b, n]", qkv.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = real token), got {mask.dtype}")
    scale = _check_scale(scale)
    check_backend(backend)
    scale = dh**-0.5 if scale is None else scale
    if b * n == 0:
        return qkv.select(2, 0) * 0  # empty, still attached to the graph
    if _use_triton(backend, qkv, dh, "local_attention_packed"):
        o, _ = _fwd_op(qkv, None, None, None, mask, None, None, scale, window_size, window_size, 0,
                       look_backward, look_forward, causal, exact_windowsize)
        return o
    return local_attention_packed_reference(
        qkv, window_size=window_size, causal=causal, look_backward=look_backward,
        look_forward=look_forward, mask=mask, scale=scale, exact_windowsize=exact_windowsize,
    )
