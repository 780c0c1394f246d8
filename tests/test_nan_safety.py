"""No bad value crosses a mask or the causal boundary.

A NaN or inf at a position a query may not see (a masked key, a key after its causal limit, one
outside its window) changes neither that query's output nor any gradient it passes back; a
query that may see one outputs NaN. Kernel level: the Triton kernels (under the interpreter)
and the references, with NaN / +inf / -inf planted in k, v (and kv_scale, q) of masked and later
keys, in the same block as clean queries and in other blocks: every unaffected output is
bitwise equal to the run with finite numbers there, every affected one is NaN, and the
gradients (with a zero cotangent at the affected outputs: they are not real) equal the clean
run's exactly. Layer level on the CPU: padded positions of the encoder layers, padded memories
of the cross attention, future positions of the causal layers and the language model.
GPU tests at realistic sizes are marked `gpu`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import local_allowed, requires_cuda

from colt5.kernels.flash_attention import attention, local_attention_packed
from colt5.kernels.flash_attention_reference import heavy_visibility

# The interpreter's dots multiply NaN and inf; numpy says so.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered"),
              pytest.mark.usefixtures("poisoned")]

BAD = (float("nan"), float("inf"), float("-inf"))


def plant(t: torch.Tensor, where: torch.Tensor, seed: int) -> torch.Tensor:
    """A copy of t [..., d] with one NaN / +inf / -inf (cycling) at a random entry of each row
    where `where` [...] is True, or a whole row of them."""
    out = t.detach().clone()
    gen = torch.Generator().manual_seed(seed)
    rows = where.nonzero()
    for c, idx in enumerate(rows.tolist()):
        if c % 4 == 3:
            out[tuple(idx)] = BAD[c % 3]
        else:
            out[(*idx, int(torch.randint(t.shape[-1], (1,), generator=gen)))] = BAD[c % 3]
    return out


def grads_of(fn, inputs: list[torch.Tensor], cot: torch.Tensor):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out.double() * cot.double()).sum(), leaves)
    return out.detach(), grads


def check_exact(fn, clean: list, poisoned: list, affected: torch.Tensor, out_shape, what: str) -> None:
    """affected: bool, the output's shape without dh. Unaffected outputs are bitwise equal to the
    clean run's, affected ones NaN; gradients with a zero cotangent at the affected outputs equal
    the clean run's exactly and are finite."""
    cot = torch.randn(out_shape, dtype=torch.float64, device=affected.device)
    cot = torch.where(affected[..., None], 0.0, cot)
    out_c, grads_c = grads_of(fn, clean, cot)
    out_p, grads_p = grads_of(fn, poisoned, cot)
    full = affected[..., None].expand(out_shape)
    assert (~full).any() and full.any(), f"{what}: the case proves nothing"
    assert torch.isfinite(out_c).all(), f"{what}: clean run not finite"
    assert torch.equal(out_p[~full], out_c[~full]), f"{what}: an unaffected output changed"
    assert torch.isnan(out_p[full]).all(), f"{what}: a query that sees a bad value is not NaN"
    for n, (gp, gc) in enumerate(zip(grads_p, grads_c)):
        assert torch.isfinite(gp).all(), f"{what}: gradient of input {n} not finite"
        assert torch.equal(gp, gc), f"{what}: gradient of input {n} changed (max diff {(gp - gc).abs().max():.3e})"


# ---------------------------------------------------------------------------------------------
# the local (windowed) attention


LOCAL_CASES = {  # n, w, causal, lb, lf, exact, masked, planted real positions, blocks
    "causal-same-block": (40, 8, True, 1, 0, False, False, (20, 21, 33), (16, 16)),
    "causal-masked-exact": (45, 8, True, 2, 0, True, True, (13, 30), (16, 16)),
    "bidir-masked": (50, 8, False, 1, 1, False, True, (25,), (32, 16)),
    "bidir-exact-default-blocks": (60, 12, False, 1, 1, True, True, (41,), None),
    # unmasked windows of two tiles: the planted keys lie in tiles every query of a block sees
    "causal-full-tiles": (64, 32, True, 1, 0, False, False, (5, 20, 40), (16, 16)),
    "bidir-full-tiles": (64, 16, False, 1, 1, False, False, (30,), (16, 16)),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", list(LOCAL_CASES), ids=list(LOCAL_CASES))
def test_local_bad_values_stay_out(case, backend, force_blocks):
    """NaN / inf in the q, k or v rows of masked positions and of real positions: queries that
    may not see them are untouched, those that may are NaN; a planted position's own query too."""
    n, w, causal, lb, lf, exact, masked, real, blocks = LOCAL_CASES[case]
    if blocks:
        force_blocks(*blocks)
    b, h, dh = 2, 2, 16
    qkv = torch.randn(b, n, 3, h, dh)
    mask = torch.rand(b, n) > 0.3 if masked else None
    bad = torch.zeros(b, n, dtype=torch.bool) if mask is None else ~mask
    bad[:, list(real)] = True
    # Rows of q, k, v at the bad positions: some with a bad k only, some a bad v, some a bad q.
    where = bad[:, :, None, None].expand(b, n, 3, h).clone()
    where[:, 0::3, 0] = False  # every third bad position keeps a finite q
    poisoned = plant(qkv, where, seed=n)
    allowed = local_allowed(n, w, lb, lf, causal, exact)  # [i, j]
    key_bad = bad if mask is None else bad & mask  # masked keys are never seen
    affected = (allowed[None] & key_bad[:, None, :]).any(-1) | where[:, :, 0, 0]  # [b, n]
    affected = affected[:, :, None].expand(b, n, h)
    kw = dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf, mask=mask, exact_windowsize=exact)
    check_exact(lambda t: local_attention_packed(t, backend=backend, **kw), [qkv], [poisoned], affected,
                (b, n, h, dh), f"{case} {backend}")


@pytest.mark.parametrize("part", [1, 2], ids=["k", "v"])
@pytest.mark.parametrize("value", BAD)
def test_local_bad_key_alone_in_a_full_tile(value, part, force_blocks):
    """A non-finite k (v finite) or v (k finite), in a tile that every query of later blocks sees
    whole: an infinite k entry gives some queries a score of -inf, and those must be NaN too."""
    force_blocks(16, 16)
    b, n, h, dh, w = 1, 64, 2, 16, 32
    qkv = torch.randn(b, n, 3, h, dh)
    poisoned = qkv.clone()
    poisoned[:, 5, part, :, 3] = value  # k or v of position 5, both heads
    affected = local_allowed(n, w, 1, 0, True, False)[:, 5][None, :, None].expand(b, n, h)
    kw = dict(window_size=w, causal=True, look_backward=1)
    check_exact(lambda t: local_attention_packed(t, backend="triton", **kw), [qkv], [poisoned], affected,
                (b, n, h, dh), f"k = {value}")


# ---------------------------------------------------------------------------------------------
# the heavy (routed) attention


def heavy_setup(b, i, j, r, g, dh, *, causal: bool, slots: tuple[int, int] | None, seed: int):
    gen = torch.Generator().manual_seed(seed)
    h = r * g
    q = torch.randn(b, i, h, dh, generator=gen)
    kv = torch.randn(b, r, j, 2, g, dh, generator=gen)
    null_kv = torch.randn(2, h, dh, generator=gen)
    kv_scale = torch.rand(b, r, j, generator=gen) + 0.25
    opts = dict(kv_mask=torch.rand(b, r, j, generator=gen) > 0.25)
    if causal:
        cq, ckv = slots
        window = 12

        def positions(shape, per):
            slot = torch.arange(shape[-1])
            return (slot // per) * window + torch.randint(0, window, shape, generator=gen).sort(-1).values

        opts.update(q_pos=positions((b, i), cq), kv_pos=positions((b, r, j), ckv), q_window_slots=cq,
                    kv_window_slots=ckv)
    return q, kv, null_kv, kv_scale, opts


HEAVY_CASES = {  # b, i, j, r, g, causal, slots, blocks, masked
    "mask": (2, 30, 40, 2, 1, False, None, (16, 16), True),
    "causal-slots-small-blocks": (1, 48, 56, 1, 2, True, (6, 7), (16, 16), True),
    "causal-slots-r2": (2, 40, 45, 2, 1, True, (5, 5), None, True),
    # no mask: earlier windows' key tiles are ones every query of a later block sees
    "causal-slots-unmasked": (1, 48, 56, 1, 2, True, (6, 7), (16, 16), False),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", list(HEAVY_CASES), ids=list(HEAVY_CASES))
def test_heavy_bad_values_stay_out(case, backend, force_blocks):
    """NaN / inf in k, v and kv_scale of masked keys and of real keys in the middle of the
    sequence (causal: visible to the later queries of a block, not to its earlier ones), and in q
    of a few queries: unaffected queries' outputs and every gradient unchanged."""
    b, i, j, r, g, causal, slots, blocks, masked = HEAVY_CASES[case]
    if blocks:
        force_blocks(*blocks)
    dh, h = 16, r * g
    q, kv, null_kv, kv_scale, opts = heavy_setup(b, i, j, r, g, dh, causal=causal, slots=slots, seed=i + j)
    mask = opts["kv_mask"] if masked else torch.ones_like(opts.pop("kv_mask"))
    bad = ~mask  # [b, r, j]
    real_bad = torch.zeros_like(bad)
    real_bad[:, :, j // 2] = real_bad[:, :, j // 3] = True  # causal: seen by the queries after them
    if not causal:
        real_bad[:] = False  # without positions a real bad key reaches every query: masked ones only
    bad = bad | real_bad
    q_bad = torch.zeros(b, i, h, dtype=torch.bool)
    q_bad[:, [3, i - 2]] = True
    kv_p = kv.clone()
    kv_p[:, :, :, 0] = plant(kv[:, :, :, 0], bad[..., None].expand(b, r, j, g), seed=1)
    kv_p[:, :, :, 1] = plant(kv[:, :, :, 1], (bad & (torch.arange(j) % 2 == 0))[..., None].expand(b, r, j, g), seed=2)
    scale_p = torch.where(bad & (torch.arange(j) % 3 == 1), float("nan"), kv_scale)
    q_p = plant(q, q_bad, seed=3)
    vis = heavy_visibility(b, r, i, j, kv_mask=mask, q_pos=opts.get("q_pos"), kv_pos=opts.get("kv_pos"),
                           q_window_slots=opts.get("q_window_slots"), kv_window_slots=opts.get("kv_window_slots"),
                           device=q.device)  # [b, r, i, j]
    sees = (vis & bad[:, :, None, :]).any(-1)  # [b, r, i]
    affected = sees.transpose(1, 2).repeat_interleave(g, dim=2) | q_bad  # [b, i, h]
    if causal:
        assert (real_bad[:, :, None, :] & vis).any(), "no query sees a planted real key"

    def fn(q, kv, null_kv, kv_scale):
        return attention(q, kv, null_kv=null_kv, kv_scale=kv_scale, backend=backend, **opts)

    check_exact(fn, [q, kv, null_kv, kv_scale], [q_p, kv_p, null_kv, scale_p], affected, (b, i, h, dh),
                f"{case} {backend}")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_cotangent_of_an_unseen_output_passes_nothing_back(backend, force_blocks):
    """An output that is NaN (its query saw a NaN) passes back no gradient, whatever its cotangent
    holds (NaN included): the clean keys it saw get the gradients of the other queries only."""
    force_blocks(16, 16)
    b, i, j, r, g, dh = 1, 40, 40, 1, 1, 16
    q, kv, null_kv, kv_scale, opts = heavy_setup(b, i, j, r, g, dh, causal=True, slots=(5, 5), seed=4)
    opts["kv_mask"][:] = True
    kv_p = kv.clone()
    kv_p[:, :, 20, 1] = float("nan")
    vis = heavy_visibility(b, r, i, j, kv_mask=None, q_pos=opts["q_pos"], kv_pos=opts["kv_pos"],
                           q_window_slots=5, kv_window_slots=5, device=q.device)
    sees = vis[0, 0, :, 20]  # [i]
    assert sees.any() and (~sees).any()

    def fn(q, kv):
        return attention(q, kv, null_kv=null_kv, kv_scale=kv_scale, backend=backend, **opts)

    cot = torch.randn(b, i, r * g, dh, dtype=torch.float64)
    _, grads_c = grads_of(fn, [q, kv], torch.where(sees[None, :, None, None], 0.0, cot))
    out_p, grads_p = grads_of(fn, [q, kv_p], torch.where(sees[None, :, None, None], float("nan"), cot))
    assert torch.isnan(out_p[:, sees]).all() and torch.isfinite(out_p[:, ~sees]).all()
    for gp, gc in zip(grads_p, grads_c):
        assert torch.equal(gp, gc)


# ---------------------------------------------------------------------------------------------
# layers (CPU: the references; routers both ways)

D = 16
SMALL = dict(light_heads=2, light_dim_head=8, heavy_heads=4, heavy_dim_head=8)
FEW_ITERS = dict(n_iters=4)  # the routers' Triton kernels are slow under the interpreter


def randomised(module: torch.nn.Module, dtype=torch.float32) -> torch.nn.Module:
    """Non-zero null tokens and larger routing tokens, so every path shows in the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "null" in name or "routing_token" in name:
                p.normal_(0, 1.0)
    return module.to(dtype).eval()


def padded_inputs(b, n, dtype=torch.float32):
    x = torch.randn(b, n, D, dtype=dtype)
    mask = torch.rand(b, n) > 0.3
    mask[:, 0] = True
    bad = plant(x, ~mask, seed=n)
    bad[0, ~mask[0]] = float("nan")  # whole rows too
    return x, bad, mask


def encoder_layers(use_triton: bool):
    from colt5.attention import ConditionalRoutedAttention
    from colt5.block import ConditionalRoutedTransformer, ConditionalRoutedTransformerBlock

    attn = dict(num_heavy_tokens_q=8, num_heavy_tokens_kv=10, light_window_size=8, use_triton=use_triton,
                router_kwargs=FEW_ITERS, **SMALL)
    block = dict(num_heavy_attn_tokens_q=8, num_heavy_attn_tokens_kv=10, num_heavy_ff_tokens=6, light_window_size=8,
                 use_triton=use_triton, router_kwargs=FEW_ITERS, **SMALL)
    return {
        "attention": lambda: ConditionalRoutedAttention(D, num_routed_kv=2, rotary_emb=True, **attn),
        "block": lambda: ConditionalRoutedTransformerBlock(D, num_routed_kv=2, **block),
        "stack": lambda: ConditionalRoutedTransformer(D, depth=2, **block),
    }


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton-routers", "reference-routers"])
@pytest.mark.parametrize("layer", ["attention", "block", "stack"])
def test_encoder_padding_never_reaches_real_outputs(layer, use_triton):
    """NaN / inf at padded positions of x: the real outputs are exactly those of any finite x there
    (routed and not: n = 37 > 10 routed key-values, n = 7 < 8 routed queries)."""
    model = randomised(encoder_layers(use_triton)[layer]())
    for n in (37, 7):
        x, bad, mask = padded_inputs(2, n)
        with torch.no_grad():
            ref = model(torch.where(mask[..., None], x, 0.5), mask=mask)
            out = model(bad, mask=mask)
        assert torch.isfinite(ref).all()
        assert torch.equal(out[mask], ref[mask]), f"n={n}"


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton-routers", "reference-routers"])
@pytest.mark.parametrize("routes", [1, 2])
@pytest.mark.parametrize("m", [9, 40], ids=["all-memories-pass", "routed"])
def test_cross_attention_padded_memories(m, routes, use_triton):
    """NaN / inf in padded memories, when every memory passes (m = 9 < 12) and when routed: the
    output is exactly that of any finite padding."""
    from colt5.cross_attention import ConditionalRoutedCrossAttention

    model = randomised(ConditionalRoutedCrossAttention(D, num_tokens_q=6, num_tokens_kv=12, dim_head=8, heads=4,
                                                       kv_routing_tokens=routes, use_triton=use_triton,
                                                       router_kwargs=FEW_ITERS))
    x = torch.randn(2, 13, D)
    context = torch.randn(2, m, D)
    context_mask = torch.rand(2, m) > 0.3
    context_mask[:, 0] = True
    bad = plant(context, ~context_mask, seed=m)
    with torch.no_grad():
        ref = model(x, torch.where(context_mask[..., None], context, -2.0), context_mask=context_mask)
        out = model(x, bad, context_mask=context_mask)
    assert torch.isfinite(ref).all() and torch.equal(out, ref)


def causal_layers(use_triton: bool):
    from colt5.autoregressive import (
        ConditionalRoutedAutoregressiveAttention,
        ConditionalRoutedAutoregressiveTransformer,
        ConditionalRoutedAutoregressiveTransformerBlock,
    )
    from colt5.lm import CoLT5LanguageModel

    common = dict(light_window_size=8, heavy_window_size=12, use_triton=use_triton, router_kwargs=FEW_ITERS, **SMALL)
    return {
        "attention": lambda: ConditionalRoutedAutoregressiveAttention(
            D, num_heavy_tokens_q=2, num_heavy_tokens_kv=3, num_routed_kv=2, rotary_emb=True, **common),
        "block": lambda: ConditionalRoutedAutoregressiveTransformerBlock(D, num_routed_kv=2, **common),
        "stack": lambda: ConditionalRoutedAutoregressiveTransformer(D, depth=2, **common),
        "lm-backbone": lambda: CoLT5LanguageModel(dim=D, depth=1, max_seq_len=64, **common).backbone,
    }


# float64 with the reference routers only: the fused causal router is slow under the interpreter
@pytest.mark.parametrize("use_triton,dtype", [(True, torch.float32), (False, torch.float32), (False, torch.float64)],
                         ids=["triton-routers-fp32", "reference-routers-fp32", "reference-routers-fp64"])
@pytest.mark.parametrize("layer", ["attention", "block", "stack", "lm-backbone"])
def test_causal_layers_future_nan(layer, use_triton, dtype):
    """NaN (or inf) at position p: every output before p is exactly what it was, and finite.
    One batch row per p: 20 is inside a light window (16..23) and a heavy one (12..23), 5 in the
    first windows, 33 near the end."""
    model = randomised(causal_layers(use_triton)[layer](), dtype)
    x = torch.randn(3, 40, D, dtype=dtype)
    bad = x.clone()
    ps = (20, 5, 33)
    for row, (p, value) in enumerate(zip(ps, (float("nan"), float("inf"), float("-inf")))):
        bad[row, p] = value
    with torch.no_grad():
        ref, out = model(x), model(bad)
    for row, p in enumerate(ps):
        assert torch.isfinite(out[row, :p]).all(), f"p={p}"
        assert torch.equal(out[row, :p], ref[row, :p]), f"p={p}"
        assert not torch.isfinite(out[row, p]).all() or layer == "attention", f"p={p}: the test proves nothing"


# ---------------------------------------------------------------------------------------------
# GPU, realistic sizes (COLT5_GPU_TESTS=1 python -m pytest -q -m gpu tests/test_nan_safety.py)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_gpu_local_bad_values_bf16_n8192(causal):
    b, n, h, dh, w = 2, 8192, 8, 64, 128
    qkv = torch.randn(b, n, 3, h, dh, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(b, n, device="cuda") > 0.1
    bad = ~mask
    real = torch.tensor([1000, 1001, 4100, 8000], device="cuda")  # mid-block, block edges
    bad[:, real] = True
    where = bad[:, :, None, None].expand(b, n, 3, h).clone()
    poisoned = qkv.clone()
    poisoned[where] = float("nan")
    poisoned[:, 4100, 2] = float("inf")
    lf = 0 if causal else 1
    allowed = local_allowed(n, w, 1, lf, causal, False).cuda()
    affected = (allowed[None] & (bad & mask)[:, None, :]).any(-1) | bad  # [b, n]
    kw = dict(window_size=w, causal=causal, look_backward=1, look_forward=lf, mask=mask)
    check_exact(lambda t: local_attention_packed(t, **kw), [qkv], [poisoned], affected[:, :, None].expand(b, n, h),
                (b, n, h, dh), "gpu local")


@pytest.mark.gpu
@requires_cuda
def test_gpu_heavy_bad_values_bf16():
    """Causal slots as the autoregressive layer builds them: 64 heavy windows of 128 tokens."""
    b, r, g, dh = 1, 2, 4, 64
    i, j = 8192 // 8, 8192 // 4
    cq, ckv, window = i // 64, j // 64, 128
    dev = "cuda"
    q = torch.randn(b, i, r * g, dh, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(b, r, j, 2, g, dh, device=dev, dtype=torch.bfloat16)
    null_kv = torch.randn(2, r * g, dh, device=dev) * 0.02
    kv_scale = torch.rand(b, r, j, device=dev)
    qs, ks = torch.arange(i, device=dev), torch.arange(j, device=dev)
    opts = dict(kv_mask=torch.rand(b, r, j, device=dev) > 0.1,
                q_pos=((qs // cq) * window + (qs % cq) * (window // cq)).expand(b, i).contiguous(),
                kv_pos=((ks // ckv) * window + (ks % ckv) * (window // ckv)).expand(b, r, j).contiguous(),
                q_window_slots=cq, kv_window_slots=ckv)
    bad = ~opts["kv_mask"]
    bad[:, :, [700, 701, 1500]] = True
    kv_p = kv.clone()
    kv_p[:, :, :, 0][bad] = float("nan")
    kv_p[:, :, :, 1][bad & (ks % 2 == 0)] = float("inf")
    vis = heavy_visibility(b, r, i, j, kv_mask=opts["kv_mask"], q_pos=opts["q_pos"], kv_pos=opts["kv_pos"],
                           q_window_slots=cq, kv_window_slots=ckv, device=dev)
    affected = (vis & bad[:, :, None, :]).any(-1).transpose(1, 2).repeat_interleave(g, dim=2)

    def fn(q, kv, null_kv, kv_scale):
        return attention(q, kv, null_kv=null_kv, kv_scale=kv_scale, **opts)

    check_exact(fn, [q, kv, null_kv, kv_scale], [q, kv_p, null_kv, kv_scale], affected, (b, i, r * g, dh), "gpu heavy")
