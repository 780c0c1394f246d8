"""Local (windowed) multi-head attention: the light attention branch of CoLT5.

Shapes: b batch, h heads, n tokens, d head dim, w window size, W = ceil(n / w) windows,
L = look_backward + 1 + look_forward windows seen by each query.

Semantics (those of `local_attention.LocalAttention(..., autopad=True, use_rotary_pos_emb=False)`):
the sequence is cut into windows of w tokens from position 0; a query in window i attends to the
keys of windows i - look_backward .. i + look_forward that exist. `causal` adds key <= query;
`exact_windowsize` further limits query - key <= w * look_backward (and, non-causal,
key - query <= w * look_forward). `mask` [b, n] marks real tokens (True); it masks KEYS only, so
a padding query still gets an output. Two deliberate differences from the package:
  * positions >= n (autopad) are never keys. The package lets its zero-padded keys into the
    softmax when no mask is passed (it equals ours when given an all-True mask).
  * a query with no key left (all masked) outputs zeros with zero gradients; the package returns
    a uniform average that includes its -1 look-around padding values.

Backends: "reference" (plain PyTorch over [W, w, L*w] tiles, O(n * L * w) memory; the
specification and the CPU path; it lives in colt5.kernels.flash_attention_reference), "triton" (the
flash-attention kernels of colt5.kernels.flash_attention on the packed [b, n, 3, h, d] layout: one
forward launch, two backward launches; the CUDA default when d is a power of two in 16..128)
and "flex" (torch's flex_attention with a BlockMask built from per-block kv indices, compiled on
CUDA; eager on CPU, forward only there; kept for comparison).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colt5.decoding import DecodePosition, reuse, without_grad_when_decoding
from colt5.kernels.checks import check_int
from colt5.kernels.flash_attention import local_attention_packed, resolve_look, triton_supports
from colt5.kernels.flash_attention_reference import local_attention_reference
from colt5.precision import Linear
from colt5.rotary import RotaryEmbedding

__all__ = ["LocalMHA", "LocalAttentionCache", "local_attention", "local_attention_reference", "local_attention_flex"]

_BACKENDS = (None, "reference", "flex", "triton")
# flex_attention's tile. With w = 128 and look 1/1 every query block sees exactly 3 full kv blocks.
_BLOCK = 128

# the shared checks (kernels.attention validates the packed entry point the same way)
_check_int = check_int
_resolve_look = resolve_look


# --------------------------------------------------------------------------------------------
# argument checks (public boundary)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [b, h, n, d], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must have the same shape and v the same [b, h, n]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise TypeError("q, k, v must share dtype and device")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = real token), got {mask.dtype}")
        b, _, n, _ = q.shape
        if mask.shape != (b, n):
            raise ValueError(f"mask must be [b, n] = {(b, n)}, got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")


# --------------------------------------------------------------------------------------------
# flex backend

_compiled_flex: Callable | None = None
_block_mask_cache: OrderedDict = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 32


def _flex_fn(device: torch.device) -> Callable:
    """flex_attention compiled once (lazily) for CUDA; eager elsewhere. Eager flex on CUDA would
    evaluate a dense n x n score matrix, so CUDA always takes the compiled one."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _window_mask_mod(n: int, w: int, lb: int, lf: int, causal: bool, exact: bool) -> Callable:
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        diff = kv_idx // w - q_idx // w
        ok = (diff >= -lb) & (diff <= lf) & (kv_idx < n)
        if causal:
            ok = ok & (kv_idx <= q_idx)
        if exact:
            ok = ok & (q_idx - kv_idx <= w * lb)
            if not causal:
                ok = ok & (kv_idx - q_idx <= w * lf)
        return ok

    return mask_mod


def _window_kv_blocks(
    n: int, w: int, lb: int, lf: int, causal: bool, exact: bool, all_partial: bool, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per query block of _BLOCK rows: (partial_num, partial_idx, full_num, full_idx) as
    from_kv_blocks wants them, [1, 1, nb] and [1, 1, nb, nb] int32, from interval arithmetic on
    block bounds (O(nb * span) work, never per element). Shapes depend only on the ints, so
    torch.compile traces it into the graph with no host synchronisation (no graph break)."""
    B = _BLOCK
    nb = math.ceil(n / B)
    # Keys a query block may see span at most B - 1 + (lb + lf + 2) * w positions, so at most
    # this many kv blocks: a static bound, where the exact max would need a .item().
    span = min(nb, (2 * B - 2 + (lb + lf + 2) * w) // B + 1)
    q_lo = torch.arange(nb, device=device) * B
    q_hi = q_lo + B - 1  # last row of the block, possibly >= n (padding rows)
    q_last = q_hi.clamp_max(n - 1)

    # Interval of keys any row of the block may see.
    lo = ((q_lo // w) - lb).clamp_min(0) * w
    hi = ((q_last // w) + lf + 1) * w - 1
    if causal:
        hi = torch.minimum(hi, q_last)
    if exact:
        lo = torch.maximum(lo, q_lo - w * lb)
        if not causal:
            hi = torch.minimum(hi, q_last + w * lf)
    hi = hi.clamp_max(n - 1)
    kb_lo, kb_hi = lo // B, hi // B
    slots = torch.arange(span, device=device)
    kb = kb_lo[:, None] + slots[None, :]  # [nb, span] candidate kv blocks
    present = kb <= kb_hi[:, None]

    # A block pair is full when every (row, key) in it passes the mask: check the extremes.
    k_min, k_max = kb * B, kb * B + B - 1
    full = present & (k_max < n)
    full &= (k_min // w - q_hi[:, None] // w >= -lb) & (k_max // w - q_lo[:, None] // w <= lf)
    if causal:
        full &= k_max <= q_lo[:, None]
    if exact:
        full &= q_hi[:, None] - k_min <= w * lb
        if not causal:
            full &= k_max - q_lo[:, None] <= w * lf
    if all_partial:
        full &= False
    partial = present & ~full

    def pack(sel: Tensor) -> tuple[Tensor, Tensor]:
        # Selected indices first, ascending; the tail is unused (filled with 0). Output slot j
        # takes the candidate that is the (j+1)-th selected: a [nb, span, span] compare that
        # inductor fuses into one kernel (an argsort here cost two radix-sort launches per step).
        count = sel.sum(-1, keepdim=True)
        rank = sel.cumsum(-1)  # [nb, span]: selected candidates so far
        hit = sel[:, None, :] & (rank[:, None, :] == slots[None, :, None] + 1)  # [nb, j, slot]
        chosen = (hit * kb[:, None, :]).sum(-1).to(torch.int32)
        idx = F.pad(chosen, (0, nb - span))
        return count.squeeze(-1).to(torch.int32)[None, None], idx[None, None]

    return (*pack(partial), *pack(full))


def _block_mask(
    n: int, w: int, lb: int, lf: int, causal: bool, exact: bool, device: torch.device,
    key_mask: Tensor | None = None,
):
    """The sliding-window BlockMask, with a key padding mask [b, n_pad] folded into mask_mod
    when given (every block then partial: a full block would skip mask_mod).

    Eager: the window's index tensors are cached; a key mask gets a shallow copy with its own
    mask_mod. Under torch.compile the mask is built inside the graph (a few tiny kernels, and
    dynamo cannot trace copy.copy): a tensor cached from a compiled, CUDA-graphed region would
    be overwritten by the next replay."""
    from torch.nn.attention.flex_attention import BlockMask

    all_partial = key_mask is not None
    window_mod = _window_mask_mod(n, w, lb, lf, causal, exact)

    def key_masked_mod(bi: Tensor, hi: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return window_mod(bi, hi, q_idx, kv_idx) & key_mask[bi, kv_idx]

    mask_mod = window_mod if key_mask is None else key_masked_mod

    if torch.compiler.is_compiling():
        blocks = _window_kv_blocks(n, w, lb, lf, causal, exact, all_partial, device)
        return BlockMask.from_kv_blocks(*blocks, BLOCK_SIZE=_BLOCK, mask_mod=mask_mod)
    key = (n, w, lb, lf, causal, exact, all_partial, str(device))
    bm = _block_mask_cache.get(key)
    if bm is None:
        blocks = _window_kv_blocks(n, w, lb, lf, causal, exact, all_partial, device)
        bm = _block_mask_cache[key] = BlockMask.from_kv_blocks(*blocks, BLOCK_SIZE=_BLOCK, mask_mod=window_mod)
        if len(_block_mask_cache) > _BLOCK_MASK_CACHE_SIZE:
            _block_mask_cache.popitem(last=False)
    else:
        _block_mask_cache.move_to_end(key)
    if key_mask is not None:
        bm = copy.copy(bm)  # shallow: shares the cached index tensors
        bm.mask_mod = mask_mod
    return bm


def local_attention_flex(
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
    """flex_attention path (no argument checks; call `local_attention`). Pads n up to a multiple
    of 128 (so every torch >= 2.5 accepts the lengths); keys past n are masked by mask_mod. A key
    padding mask is folded into mask_mod as a captured [b, n_pad] tensor, with every block
    demoted to partial (a full block would skip mask_mod)."""
    b, h, n, d = q.shape
    w, lb, lf = window_size, look_backward, look_forward
    pad = math.ceil(n / _BLOCK) * _BLOCK - n
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    key_mask = F.pad(mask, (0, pad), value=False) if mask is not None else None
    bm = _block_mask(n, w, lb, lf, causal, exact_windowsize, q.device, key_mask)
    out = _flex_fn(q.device)(q, k, v, block_mask=bm, scale=scale)
    return out[:, :, :n] if pad else out


# --------------------------------------------------------------------------------------------
# public op


def _default_backend(q: Tensor, v_dim: int) -> str:
    """CUDA: the Triton kernels when they take q's dtype and head dim (and v's head dim is q's),
    else flex for the other power-of-two head dims >= 16; otherwise (CPU) the reference."""
    if not q.is_cuda:
        return "reference"
    d = q.shape[-1]
    if v_dim == d and triton_supports(q.dtype, d):
        return "triton"
    flex_ok = d >= 16 and (d & (d - 1)) == 0 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    return "flex" if flex_ok else "reference"


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
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
    """Windowed attention.

    q, k: [b, h, n, d]; v: [b, h, n, e]; same dtype and device. window_size >= 1;
    look_backward >= 0; look_forward >= 0, default 0 if causal else 1 (must be 0 when causal).
    mask: bool [b, n], True = real token (masks keys only). scale: default d ** -0.5.
    backend: None (on CUDA "triton" when d is a power of two in 16..128 and e == d, else "flex"
    for other power-of-two d >= 16, else "reference"; on CPU "reference"), "reference", "triton"
    (CUDA, or CPU under TRITON_INTERPRET=1; needs e == d; stacks q, k, v into the packed
    [b, n, 3, h, d] layout, one copy: `LocalMHA` passes its projection straight through) or
    "flex" (on CPU: eager flex_attention, forward only).
    Returns [b, h, n, e] in q's dtype (a transposed view for "triton"); queries with no visible
    key get zeros.
    Raises TypeError / ValueError on bad arguments.
    """
    _check_qkv(q, k, v, mask)
    window_size = _check_int("window_size", window_size, 1)
    look_backward, look_forward = _resolve_look(bool(causal), look_backward, look_forward)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    backend = backend or _default_backend(q, v.shape[-1])
    kwargs = dict(
        window_size=window_size,
        causal=bool(causal),
        look_backward=look_backward,
        look_forward=look_forward,
        mask=mask,
        scale=None if scale is None else float(scale),
        exact_windowsize=bool(exact_windowsize),
    )
    if backend == "triton":
        if v.shape[-1] != q.shape[-1]:
            raise ValueError(f"backend='triton' needs v's head dim equal to q's ({q.shape[-1]}), got {v.shape[-1]}")
        qkv = torch.stack((q, k, v), dim=2).permute(0, 3, 2, 1, 4)  # [b, n, 3, h, d], a view of the stack
        return local_attention_packed(qkv, backend="triton", **kwargs).transpose(1, 2)
    if backend == "flex":
        return local_attention_flex(q, k, v, **kwargs)
    # The reference pads q, k, v to whole windows and views them as tiles. A zero pad keeps a
    # non-contiguous input's strides where torch.compile's dynamic-shape meta assumes a
    # contiguous result, so with n a multiple of the window the view failed at run time ("view
    # size is not compatible", torch 2.13). Contiguous inputs make both agree.
    return local_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), **kwargs)


# --------------------------------------------------------------------------------------------
# module


class LocalAttentionCache:
    """A causal LocalMHA's keys and values for decoding: the last R = (look_backward + 1) * w
    positions in a ring (position p at slot p % R), k and v [b, h, R, dh] (k rotated), and the
    position each slot holds, pos [R] (a large negative number while empty)."""

    EMPTY = -(2**40)

    def __init__(self, position: DecodePosition) -> None:
        self.position = position
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.pos: Tensor | None = None


class LocalMHA(nn.Module):
    """Multi-head local attention: qkv projection -> local_attention -> out projection.

    No normalization inside (the caller pre-norms). forward(x [b, n, dim], mask [b, n] bool or
    None) -> [b, n, dim]. With rotary_emb, q and k are rotated at positions 0..n-1.

    Causal instances decode incrementally: forward(x, cache=LocalAttentionCache) is the usual
    forward that also keeps the last windows' keys/values when the cache is empty (the prefill),
    and one query at position cache.position.length against them after that (the owner of the
    position advances it).
    """

    def __init__(
        self,
        dim: int,
        *,
        window_size: int,
        dim_head: int = 64,
        heads: int = 8,
        causal: bool = False,
        look_backward: int = 1,
        look_forward: int | None = None,
        exact_windowsize: bool = False,
        rotary_emb: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.dim = _check_int("dim", dim, 1)
        self.dim_head = _check_int("dim_head", dim_head, 1)
        self.heads = _check_int("heads", heads, 1)
        self.window_size = _check_int("window_size", window_size, 1)
        self.causal = bool(causal)
        self.look_backward, self.look_forward = _resolve_look(self.causal, look_backward, look_forward)
        self.exact_windowsize = bool(exact_windowsize)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.backend = backend
        inner = heads * dim_head
        self.to_qkv = Linear(dim, 3 * inner, bias=False)
        self.to_out = Linear(inner, dim, bias=False)
        if rotary_emb and dim_head % 2:
            raise ValueError(f"rotary_emb needs an even dim_head, got {dim_head}")
        self.rotary = RotaryEmbedding(dim_head) if rotary_emb else None

    def new_cache(self, position: DecodePosition) -> LocalAttentionCache:
        if not self.causal:
            raise ValueError("only a causal LocalMHA decodes incrementally (a later token would change earlier outputs)")
        return LocalAttentionCache(position)

    @without_grad_when_decoding
    def forward(self, x: Tensor, mask: Tensor | None = None, *, cache: LocalAttentionCache | None = None) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [b, n, dim={self.dim}], got shape {tuple(x.shape)}")
        if cache is not None:
            if mask is not None:
                raise ValueError("mask must be None when decoding with a cache")
            if cache.position.length:
                return self._decode(x, cache)
        b, n, _ = x.shape
        h, dh = self.heads, self.dim_head
        qkv = self.to_qkv(x).view(b, n, 3, h, dh)
        if self.rotary is not None:  # q and k heads turned at 0 .. n-1 in one pass, v copied
            qkv = self.rotary.rotate(qkv.view(b, n, 3 * h, dh), rotated=2 * h).view(b, n, 3, h, dh)
        if cache is not None:
            self._fill_cache(cache, qkv)
        backend = self.backend or _default_backend(qkv, self.dim_head)
        if backend == "triton":
            # The projection's output goes to the kernels as it is, and its gradient comes back
            # as one tensor in the same layout.
            out = local_attention_packed(
                qkv,
                window_size=self.window_size,
                causal=self.causal,
                look_backward=self.look_backward,
                look_forward=self.look_forward,
                mask=mask,
                exact_windowsize=self.exact_windowsize,
                backend="triton",
            )
            return self.to_out(out.view(b, n, self.heads * self.dim_head))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = local_attention(
            q,
            k,
            v,
            window_size=self.window_size,
            causal=self.causal,
            look_backward=self.look_backward,
            look_forward=self.look_forward,
            mask=mask,
            exact_windowsize=self.exact_windowsize,
            backend=backend,
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))

    # ---- cached decoding -------------------------------------------------------------------
    def _ring(self) -> int:
        return (self.look_backward + 1) * self.window_size

    def _fill_cache(self, cache: LocalAttentionCache, qkv: Tensor) -> None:
        """Keep the prefill's last R keys/values (qkv [b, n, 3, h, dh], keys rotated): every
        later query's window starts at or after n - R + 1."""
        b, n = qkv.shape[:2]
        R = self._ring()
        lo = max(0, n - R)
        k, v = qkv[:, lo:, 1].transpose(1, 2), qkv[:, lo:, 2].transpose(1, 2)  # [b, h, m, dh]
        positions = torch.arange(lo, n, device=qkv.device)
        shape = (b, self.heads, R, self.dim_head)
        cache.k = reuse(cache.k, shape, k.dtype, k.device, 0.0)
        cache.v = reuse(cache.v, shape, v.dtype, v.device, 0.0)
        cache.pos = reuse(cache.pos, (R,), torch.long, k.device, LocalAttentionCache.EMPTY)
        slots = positions % R
        cache.k.index_copy_(2, slots, k)
        cache.v.index_copy_(2, slots, v)
        cache.pos.index_copy_(0, slots, positions)

    def _decode(self, x: Tensor, cache: LocalAttentionCache) -> Tensor:
        """x [b, 1, dim] at position p -> [b, 1, dim]: the query sees the keys of windows
        p // w - look_backward .. p // w up to p (as local_attention_reference)."""
        b = x.shape[0]
        h, dh, w, R = self.heads, self.dim_head, self.window_size, self._ring()
        pos = cache.position.tensor
        qkv = self.to_qkv(x).view(b, 1, 3 * h, dh)
        if self.rotary is not None:
            qkv = self.rotary.rotate(qkv, pos.view(1), rotated=2 * h)
        q, k, v = qkv.view(b, 1, 3, h, dh).permute(2, 0, 3, 1, 4)  # each [b, h, 1, dh]
        slot = (pos % R).view(1)
        cache.k.index_copy_(2, slot, k.to(cache.k.dtype))
        cache.v.index_copy_(2, slot, v.to(cache.v.dtype))
        cache.pos.index_copy_(0, slot, pos.view(1))
        visible = (cache.pos >= (pos // w - self.look_backward) * w) & (cache.pos <= pos)
        if self.exact_windowsize:
            visible = visible & (pos - cache.pos <= w * self.look_backward)
        acc = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # fp32 scores and softmax, as the kernels
            sim = torch.matmul(q.to(acc) * dh**-0.5, cache.k.to(acc).transpose(2, 3))  # [b, h, 1, R]
            attn = sim.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            out = torch.matmul(attn, cache.v.to(acc)).to(q.dtype)  # [b, h, 1, dh]
        return self.to_out(out.transpose(1, 2).reshape(b, 1, h * dh))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, window_size={self.window_size}, "
            f"causal={self.causal}, look_backward={self.look_backward}, look_forward={self.look_forward}"
        )
