"""Plain PyTorch attention: the specification of the Triton kernels in `attention.py`, and the
path for CPU tensors.

Shapes: b batch, i queries, j keys, h heads, r key-value routes, g = h / r heads per route,
dh head dim; local attention: n tokens, w window size, W = ceil(n / w) windows,
L = look_backward + 1 + look_forward windows seen by each query.

Both compute scores and softmax in float32 (float64 for float64 inputs) and return q's dtype.
A query with nothing visible (no null key, no visible key) outputs zeros with zero gradients.

Non-finite values (the kernels' rule, exact per query): a query whose own q holds a NaN or inf,
or that may see a key whose k or value (times kv_scale) holds one, outputs NaN, a constant: no
gradient flows back through it; the null value is such a key for every query of its head.
Every other output and gradient is exactly what it would be with any finite numbers in the keys
it may not see (masked, causally later, outside its window): those are selected away before any
product, never multiplied by 0, since 0 * NaN is NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_reference",
    "heavy_visibility",
    "local_attention_reference",
    "local_attention_packed_reference",
]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # float32, or float64 for float64 inputs


# --------------------------------------------------------------------------------------------
# heavy (routed) attention


def heavy_visibility(
    b: int,
    r: int,
    i: int,
    j: int,
    *,
    kv_mask: Tensor | None,
    q_pos: Tensor | None,
    kv_pos: Tensor | None,
    q_window_slots: int | None,
    kv_window_slots: int | None,
    kv_span: int | None = None,
    device: torch.device,
) -> Tensor:
    """bool [b, r, i, j]: may query i see key j of route r? kv_mask, then causal by original
    position (kv_pos <= q_pos), then no key of a later window (j // Ckv <= i // Cq), then, with
    kv_span = K, only the K most recent key slots up to the query's window:
    j >= (i // Cq + 1) * Ckv - K."""
    vis = torch.ones(b, r, i, j, dtype=torch.bool, device=device)
    if kv_mask is not None:
        vis = vis & kv_mask[:, :, None, :]
    if q_pos is not None:
        vis = vis & (kv_pos[:, :, None, :] <= q_pos[:, None, :, None])
    if q_window_slots is not None:
        qw = torch.arange(i, device=device) // q_window_slots
        kj = torch.arange(j, device=device)
        vis = vis & ((kj // kv_window_slots)[None, :] <= qw[:, None])
        if kv_span is not None:
            vis = vis & (kj[None, :] >= (qw[:, None] + 1) * kv_window_slots - kv_span)
    return vis


def attention_reference(
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
) -> Tensor:
    """The heavy attention of `attention.attention` (no argument checks; call that).

    q [b, i, h, dh]; kv [b, r, j, 2, g, dh] (route r serves heads r*g .. r*g+g-1); null_kv
    [2, h, dh]; kv_scale [b, r, j] multiplies v; kv_mask [b, r, j] bool; q_pos [b, i] and
    kv_pos [b, r, j] make it causal by position; window slots and kv_span as in
    `heavy_visibility`. Returns [b, i, h, dh] in q's dtype.

    Written as the closed form of the online softmax with the null key/value as its initial
    state: out = (p0 v0 + sum_j p_j v_j) / (p0 + sum_j p_j), all p relative to one row max.
    """
    b, i, h, dh = q.shape
    r, j, g = kv.shape[1], kv.shape[2], kv.shape[4]
    acc = _compute_dtype(q)
    scale = dh**-0.5 if scale is None else scale
    qh = q.to(acc).view(b, i, r, g, dh).permute(0, 2, 3, 1, 4)  # [b, r, g, i, dh]
    k = kv[:, :, :, 0].to(acc).transpose(2, 3)  # [b, r, g, j, dh]
    v = kv[:, :, :, 1].to(acc).transpose(2, 3)
    s = None if kv_scale is None else kv_scale.to(acc)[:, :, None, :]  # [b, r, 1, j]
    # Per head: a key is good when its k and its scaled value are finite, a query when its q is.
    v_eff = v if s is None else v * s[..., None]
    good = torch.isfinite(k).all(-1) & torch.isfinite(v_eff).all(-1)  # [b, r, g, j]
    q_good = torch.isfinite(qh).all(-1)  # [b, r, g, i]
    keep = good if kv_mask is None else good & kv_mask[:, :, None, :]
    # Selects, not multiplies: a masked, later or non-finite key, value or scale must not reach
    # any other output or gradient.
    qh = torch.where(q_good[..., None], qh, 0.0)
    k, v = torch.where(keep[..., None], k, 0.0), torch.where(keep[..., None], v, 0.0)
    if s is not None:
        v = v * torch.where(keep, s, 0.0)[..., None]
    vis = heavy_visibility(b, r, i, j, kv_mask=kv_mask, q_pos=q_pos, kv_pos=kv_pos,
                           q_window_slots=q_window_slots, kv_window_slots=kv_window_slots,
                           kv_span=kv_span, device=q.device)[:, :, None]  # [b, r, 1, i, j]
    poisoned = ~q_good | (vis & ~good[:, :, :, None, :]).any(-1)  # [b, r, g, i]
    sim = torch.einsum("brgid,brgjd->brgij", qh, k) * scale
    sim = sim.masked_fill(~vis, float("-inf"))
    row_max = sim.amax(dim=-1) if j else sim.new_full(sim.shape[:-1], float("-inf"))
    if null_kv is not None:
        nk = null_kv[0].to(acc).view(r, g, dh)
        nv = null_kv[1].to(acc).view(r, g, dh)
        null_sim = torch.einsum("brgid,rgd->brgi", qh, nk) * scale
        row_max = torch.maximum(row_max, null_sim)
        poisoned = poisoned | ~torch.isfinite(nv).all(-1)[None, :, :, None]  # every query sees it
    # The softmax does not depend on the shift; an empty row (max -inf) shifts by 0.
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0).detach()
    p = torch.exp(sim - shift[..., None])  # exactly 0 where invisible
    num = torch.einsum("brgij,brgjd->brgid", p, v)
    den = p.sum(dim=-1)
    if null_kv is not None:
        p0 = torch.exp(null_sim - shift)
        num = num + p0[..., None] * nv[:, :, None, :]
        den = den + p0
    out = torch.where(den[..., None] > 0, num / den.clamp_min(torch.finfo(acc).tiny)[..., None], 0.0)
    out = torch.where(poisoned[..., None], float("nan"), out)
    return out.permute(0, 3, 1, 2, 4).reshape(b, i, h, dh).to(q.dtype)


# --------------------------------------------------------------------------------------------
# light (windowed) attention


def _look_around(x: Tensor, backward: int, forward: int, pad_value: float | bool, dim: int) -> Tensor:
    """[..., W, w, ...] (windows at `dim`) -> [..., W, L * w, ...]: each window's neighbours, in
    order of offset -backward .. forward, concatenated along the within-window dim."""
    windows = x.shape[dim]
    pad = [0, 0] * (x.dim() - dim - 1) + [backward, forward]
    xp = F.pad(x, pad, value=pad_value)
    return torch.cat([xp.narrow(dim, i, windows) for i in range(backward + forward + 1)], dim=dim + 1)


def _window_validity(
    n: int, w: int, lb: int, lf: int, causal: bool, exact: bool, device: torch.device
) -> Tensor:
    """bool [W, w, L * w]: may query (window, slot) see key (look-around slot)?"""
    windows = math.ceil(n / w)
    pos = torch.arange(windows * w, device=device).view(windows, w)
    kpos = _look_around(pos, lb, lf, pad_value=-1, dim=0)  # [W, L*w], -1 = no window there
    qpos = pos.unsqueeze(-1)  # [W, w, 1]
    kpos = kpos.unsqueeze(1)  # [W, 1, L*w]
    valid = (kpos >= 0) & (kpos < n)
    if causal:
        valid = valid & (kpos <= qpos)
    if exact:
        valid = valid & (qpos - kpos <= w * lb)
        if not causal:
            valid = valid & (kpos - qpos <= w * lf)
    return valid


def local_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    causal: bool = False,
    look_backward: int = 1,
    look_forward: int = 1,
    mask: Tensor | None = None,
    scale: float | None = None,
    exact_windowsize: bool = False,
) -> Tensor:
    """Plain PyTorch local attention over [W, w, L*w] tiles, O(n * L * w) memory (no argument
    checks; call `colt5.local_attention.local_attention`). q, k: [b, h, n, d]; v: [b, h, n, e];
    mask [b, n] masks keys. Returns [b, h, n, e] in q's dtype."""
    b, h, n, d = q.shape
    w, lb, lf = window_size, look_backward, look_forward
    windows = math.ceil(n / w)
    pad = windows * w - n
    scale = d**-0.5 if scale is None else scale

    def tile(t: Tensor) -> Tensor:
        return F.pad(t, (0, 0, 0, pad)).unflatten(2, (windows, w))  # [b, h, W, w, e]

    acc = _compute_dtype(q)
    # A query is good when its q is finite, a key when its k and v are (see the module docstring).
    q_good = torch.isfinite(q).all(-1)  # [b, h, n]
    kv_good = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)
    q = torch.where(q_good[..., None], q, 0.0)
    k, v = torch.where(kv_good[..., None], k, 0.0), torch.where(kv_good[..., None], v, 0.0)
    bq = tile(q).to(acc) * scale
    bk = _look_around(tile(k), lb, lf, pad_value=0.0, dim=2).to(acc)  # [b, h, W, L*w, d]
    bv = _look_around(tile(v), lb, lf, pad_value=0.0, dim=2).to(acc)

    valid = _window_validity(n, w, lb, lf, causal, exact_windowsize, q.device)  # [W, w, L*w]
    if mask is not None:
        km = F.pad(mask, (0, pad), value=False).view(b, windows, w)
        km = _look_around(km, lb, lf, pad_value=False, dim=1)  # [b, W, L*w]
        valid = valid & km[:, None, :, None, :]  # [b, 1, W, w, L*w]
    bad = ~_look_around(F.pad(kv_good, (0, pad), value=True).view(b, h, windows, w), lb, lf, pad_value=True, dim=2)
    sees_bad = (valid & bad[:, :, :, None, :]).any(-1).expand(b, h, windows, w)  # valid may be [W, 1, L*w]
    poisoned = sees_bad.flatten(2)[:, :, :n] | ~q_good  # [b, h, n]

    sim = torch.einsum("bhwid,bhwjd->bhwij", bq, bk)
    # Finite fill, then select (never multiply by `valid`: 0 * NaN is NaN): a query with no
    # valid key gets zeros (and zero gradients) instead of NaN; elsewhere exp(fill - max) is
    # exactly 0 already.
    sim = sim.masked_fill(~valid, torch.finfo(sim.dtype).min)
    attn = torch.where(valid, sim.softmax(dim=-1), 0.0)
    out = torch.einsum("bhwij,bhwjd->bhwid", attn, bv).flatten(2, 3)[:, :, :n]
    return torch.where(poisoned[..., None], float("nan"), out).to(q.dtype)


def local_attention_packed_reference(
    qkv: Tensor,
    *,
    window_size: int,
    causal: bool,
    look_backward: int,
    look_forward: int,
    mask: Tensor | None = None,
    scale: float | None = None,
    exact_windowsize: bool = False,
) -> Tensor:
    """`local_attention_reference` on the packed projection qkv [b, n, 3, h, dh] -> [b, n, h, dh]
    (contiguous)."""
    q, k, v = (qkv.select(2, t).transpose(1, 2) for t in range(3))  # each [b, h, n, dh]
    out = local_attention_reference(
        q, k, v, window_size=window_size, causal=causal, look_backward=look_backward,
        look_forward=look_forward, mask=mask, scale=scale, exact_windowsize=exact_windowsize,
    )
    return out.transpose(1, 2).contiguous()
