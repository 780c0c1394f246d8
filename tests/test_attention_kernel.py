"""The flash-attention kernels (kernels/flash_attention.py): the reference against a dense float64
definition, the Triton kernels (under the interpreter on CPU) against the float64 reference,
output and every gradient; NaN safety; launch counts; block ranges; errors; torch.compile.
GPU tests at realistic sizes are marked `gpu`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOLERANCES, assert_close, local_allowed, requires_cuda

import colt5.kernels.flash_attention as A
from colt5.kernels.flash_attention import attention, block_ranges, local_attention_packed
from colt5.kernels.flash_attention_reference import attention_reference, local_attention_packed_reference

F32_OUT, F32_GRAD = TOLERANCES[torch.float32]
BF16_OUT, BF16_GRAD = TOLERANCES[torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned")


# ---------------------------------------------------------------------------------------------
# inputs and an independent definition


def heavy_inputs(b, i, j, r, g, dh, *, null=False, scale=False, mask=False, causal=False, slots=None,
                 span=None, strided=False, dtype=torch.float32, seed=0):
    """Leaves (q, kv, null_kv, kv_scale) and the non-differentiable options. slots = (Cq, Ckv):
    positions in window order, 12 positions per heavy window (span: kv_span with them). strided:
    q and kv are views with odd strides (their bases are the leaves)."""
    gen = torch.Generator().manual_seed(seed)
    h = r * g

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if strided:
        q = randn(b, h, i, dh).transpose(1, 2)  # [b, i, h, dh] with i not the outer stride
        kv = randn(b, r, j + 3, 2, g, dh)[:, :, 3:]
    else:
        q, kv = randn(b, i, h, dh), randn(b, r, j, 2, g, dh)
    opts = {}
    if null:
        opts["null_kv"] = randn(2, h, dh)
    if scale:
        opts["kv_scale"] = (torch.rand(b, r, j, generator=gen) + 0.25).to(dtype)
    if mask:
        opts["kv_mask"] = torch.rand(b, r, j, generator=gen) > 0.3
    if causal:
        if slots is None:
            span = max(i, j) + 8
            opts["q_pos"] = torch.randint(0, span, (b, i), generator=gen).sort(-1).values
            opts["kv_pos"] = torch.randint(0, span, (b, r, j), generator=gen).sort(-1).values
        else:
            cq, ckv = slots
            window = 12

            def positions(shape, per):
                slot = torch.arange(shape[-1])
                within = torch.randint(0, window, shape, generator=gen).sort(-1).values
                return (slot // per) * window + within  # sorted inside each window

            opts["q_pos"] = positions((b, i), cq)
            opts["kv_pos"] = positions((b, r, j), ckv)
            opts["q_window_slots"], opts["kv_window_slots"] = cq, ckv
            if span is not None:
                opts["kv_span"] = span
    return q, kv, opts


def dense_heavy(q, kv, *, scale=None, null_kv=None, kv_scale=None, kv_mask=None, q_pos=None, kv_pos=None,
                q_window_slots=None, kv_window_slots=None, kv_span=None):
    """float64 softmax(Q K'^T) V' per head, K' and V' with the null key/value as an explicit
    first column, and a dense [b, h, i, 1 + j] mask; rows with nothing allowed are 0."""
    b, i, h, dh = q.shape
    j, g = kv.shape[2], kv.shape[4]
    scale = dh**-0.5 if scale is None else scale
    outs = []
    for head in range(h):
        route, sub = divmod(head, g)
        k = kv[:, route, :, 0, sub].double()  # [b, j, dh]
        v = kv[:, route, :, 1, sub].double()
        if kv_scale is not None:
            v = v * kv_scale[:, route, :, None].double()
        allowed = torch.ones(b, i, j, dtype=torch.bool)
        if kv_mask is not None:
            allowed &= kv_mask[:, route][:, None, :]
        if q_pos is not None:
            allowed &= kv_pos[:, route][:, None, :] <= q_pos[:, :, None]
        if q_window_slots is not None:
            allowed &= (torch.arange(j) // kv_window_slots)[None, :] <= (torch.arange(i) // q_window_slots)[:, None]
        if kv_span is not None:  # the kv_span most recent key slots up to the end of the query's window
            window_end = (torch.arange(i) // q_window_slots + 1) * kv_window_slots
            allowed &= torch.arange(j)[None, :] >= (window_end - kv_span)[:, None]
        if null_kv is not None:
            k = torch.cat([null_kv[0, head].double().expand(b, 1, dh), k], 1)
            v = torch.cat([null_kv[1, head].double().expand(b, 1, dh), v], 1)
            allowed = torch.cat([torch.ones(b, i, 1, dtype=torch.bool), allowed], 2)
        sim = torch.einsum("bid,bjd->bij", q[:, :, head].double(), k) * scale
        has = allowed.any(-1, keepdim=True)
        sim = torch.where(has, sim.masked_fill(~allowed, float("-inf")), 0.0)
        attn = torch.where(has, sim.softmax(-1), 0.0)
        outs.append(attn @ v)
    return torch.stack(outs, 2)  # [b, i, h, dh]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with t's values and t's exact strides (clone would densify a sliced view)."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return leaf.copy_(t.detach()).requires_grad_()


def run(fn, q, kv, opts, cot):
    """Output and gradients of every differentiable input (q, kv, then null_kv, kv_scale when
    given), each a leaf with the strides it came with."""
    names = [k for k in ("null_kv", "kv_scale") if k in opts]
    leaves = [_leaf(t) for t in [q, kv] + [opts[k] for k in names]]
    out = fn(leaves[0], leaves[1], **dict(opts, **dict(zip(names, leaves[2:]))))
    grads = torch.autograd.grad((out.double() * cot.double()).sum(), leaves)
    return out, grads


def as_double(opts):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in opts.items()}


def check_against_reference(q, kv, opts, rtol_out, rtol_grad, what=""):
    cot = torch.randn(q.shape, dtype=torch.float64)
    out, grads = run(lambda a, b, **kw: attention(a, b, backend="triton", **kw), q, kv, opts, cot)
    ref, ref_grads = run(attention_reference, q.double(), kv.double(), as_double(opts), cot)
    assert out.dtype == q.dtype and out.is_contiguous()
    assert_close(out, ref, rtol_out, f"{what} out")
    names = ["dq", "dkv"] + [k for k in ("null_kv", "kv_scale") if k in opts]
    for name, a, e in zip(names, grads, ref_grads):
        assert_close(a, e, rtol_grad, f"{what} d{name}")
    return out, grads


# ---------------------------------------------------------------------------------------------
# the references


OPTION_SETS = {
    "plain": {},
    "null": dict(null=True),
    "scale": dict(scale=True),
    "mask": dict(mask=True),
    "causal": dict(causal=True),
    "causal-slots": dict(causal=True, slots=(5, 7)),
    "causal-slots-span": dict(causal=True, slots=(5, 7), span=10),
    "all": dict(null=True, scale=True, mask=True, causal=True, slots=(6, 4)),
    "all-span": dict(null=True, scale=True, mask=True, causal=True, slots=(6, 4), span=9),
}


@pytest.mark.parametrize("opt", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_reference_matches_dense_definition(opt):
    q, kv, opts = heavy_inputs(2, 23, 31, 2, 2, 8, dtype=torch.float64, seed=3, **OPTION_SETS[opt])
    cot = torch.randn(q.shape, dtype=torch.float64)
    ref, ref_grads = run(attention_reference, q, kv, opts, cot)
    dense, dense_grads = run(dense_heavy, q, kv, opts, cot)
    assert_close(ref, dense, TOLERANCES[torch.float64][0], "reference vs dense")
    for a, e in zip(ref_grads, dense_grads):
        assert_close(a, e, TOLERANCES[torch.float64][1], "reference grads vs dense")


def test_reference_empty_rows_and_masked_nan():
    """Rows with nothing visible give 0 (and 0 gradients); NaN in masked keys stays out."""
    q, kv, opts = heavy_inputs(1, 9, 12, 1, 2, 8, mask=True, dtype=torch.float64)
    opts["kv_mask"][0, 0, :] = False
    kv = kv.clone()
    kv[:, :, :, :, 0] = float("nan")  # every key of head 0 is masked anyway
    out, (dq, dkv) = run(attention_reference, q, kv, opts, torch.ones(q.shape, dtype=torch.float64))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dq, torch.zeros_like(dq))
    assert torch.equal(dkv, torch.zeros_like(dkv))


# ---------------------------------------------------------------------------------------------
# heavy attention: Triton vs the float64 reference


HEAVY_CASES = [  # id, (b, i, j, r, g, dh), options
    ("plain", (2, 67, 90, 1, 2, 16), {}),
    ("null", (1, 70, 33, 2, 1, 16), dict(null=True)),
    ("scale", (1, 65, 70, 1, 2, 32), dict(scale=True)),
    ("mask", (2, 40, 129, 2, 1, 16), dict(mask=True)),
    ("causal", (1, 80, 75, 1, 2, 16), dict(causal=True)),
    ("causal-slots", (1, 130, 70, 1, 1, 16), dict(causal=True, slots=(13, 7))),
    ("causal-slots-span", (1, 130, 70, 1, 1, 16), dict(causal=True, slots=(13, 7), span=20)),
    ("all-r2-strided", (1, 66, 69, 2, 2, 16), dict(null=True, scale=True, mask=True, causal=True, slots=(11, 12), strided=True)),
    ("all-r4", (1, 33, 47, 4, 1, 32), dict(null=True, scale=True, mask=True, causal=True)),
    ("tiny-i1-j1", (2, 1, 1, 1, 2, 16), dict(null=True, scale=True, mask=True)),
]


@pytest.mark.parametrize("shape,options", [c[1:] for c in HEAVY_CASES], ids=[c[0] for c in HEAVY_CASES])
def test_heavy_triton_matches_reference_fp32(shape, options):
    q, kv, opts = heavy_inputs(*shape, **options, seed=sum(shape))
    if options.get("strided"):
        assert not q.is_contiguous() and not kv.is_contiguous() and q.stride(1) != q.shape[2] * q.shape[3]
    check_against_reference(q, kv, opts, F32_OUT, F32_GRAD, "fp32")


@pytest.mark.parametrize(
    "shape,options,blocks",
    [((1, 50, 61, 1, 2, 16), dict(causal=True, slots=(6, 9), null=True), (16, 16)),
     ((1, 50, 61, 1, 2, 16), dict(causal=True, slots=(6, 9), null=True, scale=True, span=14), (16, 16)),
     ((1, 45, 37, 2, 1, 16), dict(mask=True, scale=True), (32, 16))],
    ids=["causal-slots-blocks16", "causal-slots-span14-blocks16", "mask-scale-blocks32x16"],
)
def test_heavy_triton_small_blocks(shape, options, blocks, force_blocks):
    """Many blocks per row and column: block skipping by window, partial last blocks."""
    force_blocks(*blocks)
    q, kv, opts = heavy_inputs(*shape, **options, seed=7)
    check_against_reference(q, kv, opts, F32_OUT, F32_GRAD, f"blocks {blocks}")


def test_heavy_triton_bf16():
    q, kv, opts = heavy_inputs(2, 70, 81, 2, 1, 32, null=True, scale=True, mask=True, causal=True,
                               dtype=torch.bfloat16, seed=11)
    out, grads = check_against_reference(q, kv, opts, BF16_OUT, BF16_GRAD, "bf16")
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_non_finite_null_value_marks_its_heads_queries(backend, force_blocks):
    """The null key/value is visible to every query: an inf in head 1's null value makes every
    output of head 1 NaN, in whole tiles and in masked ones, and leaves the other heads alone."""
    force_blocks(16, 16)
    q, kv, opts = heavy_inputs(1, 40, 50, 1, 2, 16, null=True, causal=True, slots=(5, 6), seed=5)
    clean = attention(q, kv, backend=backend, **opts)
    opts["null_kv"] = opts["null_kv"].clone()
    opts["null_kv"][1, 1, 3] = float("inf")
    out = attention(q, kv, backend=backend, **opts)
    assert torch.isnan(out[:, :, 1]).all()
    assert torch.equal(out[:, :, 0], clean[:, :, 0])


def test_int32_positions_equal_int64(force_blocks):
    force_blocks(16, 16)
    q, kv, opts = heavy_inputs(1, 40, 50, 1, 2, 16, null=True, causal=True, slots=(5, 6), seed=6)
    out = attention(q, kv, backend="triton", **opts)
    narrow = dict(opts, q_pos=opts["q_pos"].int(), kv_pos=opts["kv_pos"].int())
    assert torch.equal(attention(q, kv, backend="triton", **narrow), out)


def test_heavy_backward_is_deterministic():
    q, kv, opts = heavy_inputs(1, 40, 50, 1, 2, 16, null=True, scale=True, seed=2)
    cot = torch.randn(q.shape)
    fn = lambda a, b, **kw: attention(a, b, backend="triton", **kw)  # noqa: E731
    (_, g1), (_, g2) = run(fn, q, kv, opts, cot), run(fn, q, kv, opts, cot)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # NaN * q in the interpreter's dots
@pytest.mark.parametrize("mode", ["positions", "slots"])
def test_heavy_nan_in_invisible_keys_stays_out(mode):
    """NaN/inf in masked keys' k, v and scale, and in keys no query may see (positions after
    every query's; windows after every query's), reach no output and no gradient; the poisoned
    keys get exactly zero gradients."""
    b, r, g, dh = 2, 2, 1, 16
    if mode == "positions":
        i, j = 40, 70
        q, kv, opts = heavy_inputs(b, i, j, r, g, dh, null=True, scale=True, mask=True, causal=True, seed=5)
        q_max = opts["q_pos"].amax(-1)[:, None, None]  # [b, 1, 1]
        opts["kv_pos"][:, :, -5:] = q_max + 1 + torch.arange(5)  # a few keys after every query
        unseen = opts["kv_pos"] > q_max
    else:  # 3 query windows of 10 slots, 5 key windows of 10: the last 2 are after every query
        i, j = 30, 50
        q, kv, opts = heavy_inputs(b, i, j, r, g, dh, null=True, scale=True, mask=True, causal=True,
                                   slots=(10, 10), seed=6)
        unseen = (torch.arange(j) >= 30).expand(b, r, j)
    bad = ~opts["kv_mask"] | unseen  # [b, r, j]
    assert bad.any() and (~bad).any()
    clean_kv = kv.clone()
    clean_kv[bad[:, :, :, None, None, None].expand_as(kv)] = 0.0
    poisoned = clean_kv.clone()
    poisoned[..., 0, :, :][bad[..., None, None].expand(b, r, j, g, dh)] = float("nan")
    poisoned[..., 1, :, :][bad[..., None, None].expand(b, r, j, g, dh)] = float("inf")
    opts_p = dict(opts, kv_scale=torch.where(bad, float("nan"), opts["kv_scale"]))
    cot = torch.randn(q.shape)
    fn = lambda a, c, **kw: attention(a, c, backend="triton", **kw)  # noqa: E731
    out, grads = run(fn, q, poisoned, opts_p, cot)
    ref, ref_grads = run(attention_reference, q.double(), clean_kv.double(), as_double(opts), cot)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    assert_close(out, ref, F32_OUT, "out")
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, F32_GRAD, "grad")
    dkv, dscale = grads[1], grads[3]
    assert torch.all(dkv[bad[:, :, :, None, None, None].expand_as(dkv)] == 0)
    assert torch.all(dscale[bad] == 0)


def test_heavy_rows_with_nothing_visible_are_zero():
    b, i, j, r, g, dh = 2, 20, 30, 1, 2, 16
    q, kv, opts = heavy_inputs(b, i, j, r, g, dh, mask=True, causal=True, seed=9)
    opts["kv_mask"][0] = False  # batch 0: every key masked
    opts["q_pos"][1, :5] = -1  # batch 1: the first queries precede every key
    out, (dq, dkv) = run(lambda a, c, **kw: attention(a, c, backend="triton", **kw), q, kv, opts, torch.ones(q.shape))
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, :5], torch.zeros_like(out[1, :5]))
    assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dq[1, :5], torch.zeros_like(dq[1, :5]))
    assert torch.equal(dkv[0], torch.zeros_like(dkv[0])) and out[1, 5:].abs().sum() > 0
    # With a null key/value they attend to it alone.
    null_kv = torch.randn(2, r * g, dh)
    out = attention(q, kv, null_kv=null_kv, backend="triton", **opts)
    assert_close(out[0], null_kv[1].expand(i, r * g, dh), 1e-6, "null only")


def test_heavy_empty_inputs_launch_nothing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(A, "attention_fwd", boom)
    q, kv, _ = heavy_inputs(2, 5, 6, 1, 2, 16)
    null_kv = torch.randn(2, 2, 16, requires_grad=True)
    assert attention(q[:0], kv[:0], backend="triton").shape == (0, 5, 2, 16)
    assert attention(q[:, :0], kv, backend="triton").shape == (2, 0, 2, 16)
    assert torch.equal(attention(q, kv[:, :, :0], backend="triton"), torch.zeros_like(q))
    out = attention(q, kv[:, :, :0], null_kv=null_kv, backend="triton")
    assert_close(out, null_kv[1].detach().expand_as(q), 1e-6, "j = 0 with a null: null_v")
    out.sum().backward()
    assert torch.equal(null_kv.grad[1], torch.full((2, 16), 10.0)) and null_kv.grad[0].abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# local attention: Triton vs the float64 reference


LOCAL_CASES = [  # n, w, causal, look_backward, look_forward, exact, masked, blocks (forced: one head)
    (100, 16, False, 1, 1, False, False, None),
    (100, 16, True, 1, 0, False, True, None),
    (45, 8, False, 2, 1, True, True, (16, 16)),
    (60, 12, True, 2, 0, True, False, (16, 16)),
    (50, 64, False, 0, 0, False, True, None),
    (90, 10, False, 0, 2, True, True, (32, 16)),
    (129, 32, True, 0, 0, False, True, (32, 32)),
    (2, 4, False, 1, 1, False, False, None),
    (200, 64, True, 1, 0, False, False, (16, 16)),  # unmasked tiles inside the windows
    (130, 32, False, 1, 1, False, False, (16, 16)),
    (120, 39, True, 2, 0, True, False, (16, 16)),  # whole-tile bounds off the block multiples
    (120, 39, False, 2, 1, True, False, (16, 16)),
]


def _local_id(c):
    n, w, causal, lb, lf, exact, masked, blocks = c
    tags = [f"n{n}", f"w{w}", "causal" if causal else "bidir", f"lb{lb}", f"lf{lf}"]
    tags += ["exact"] * exact + ["masked"] * masked + ([f"blocks{blocks[0]}x{blocks[1]}"] if blocks else [])
    return "-".join(tags)


def local_run(fn, qkv, cot, **kw):
    leaf = qkv.detach().clone().requires_grad_()
    out = fn(leaf, **kw)
    (grad,) = torch.autograd.grad((out.double() * cot.double()).sum(), leaf)
    return out, grad


@pytest.mark.parametrize("case", LOCAL_CASES, ids=[_local_id(c) for c in LOCAL_CASES])
def test_local_triton_matches_reference_fp32(case, force_blocks):
    n, w, causal, lb, lf, exact, masked, blocks = case
    if blocks:
        force_blocks(*blocks)
    b, h, dh = 1, 1 if blocks else 2, 16
    qkv = torch.randn(b, n, 3, h, dh)
    mask = torch.rand(b, n) > 0.3 if masked else None
    kw = dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf, mask=mask, exact_windowsize=exact)
    cot = torch.randn(b, n, h, dh)
    out, grad = local_run(lambda t, **k: local_attention_packed(t, backend="triton", **k), qkv, cot, **kw)
    ref, ref_grad = local_run(local_attention_packed_reference, qkv.double(), cot, **kw)
    assert out.shape == (b, n, h, dh) and out.is_contiguous() and grad.shape == qkv.shape
    assert_close(out, ref, F32_OUT, "out")
    for c, name in enumerate("qkv"):
        assert_close(grad[:, :, c], ref_grad[:, :, c], F32_GRAD, f"d{name}")


def test_local_triton_bf16_and_scale():
    b, n, h, dh = 2, 70, 2, 32
    qkv = torch.randn(b, n, 3, h, dh).bfloat16()
    mask = torch.rand(b, n) > 0.2
    kw = dict(window_size=16, causal=False, look_backward=1, look_forward=1, mask=mask, scale=0.3)
    cot = torch.randn(b, n, h, dh)
    out, grad = local_run(lambda t, **k: local_attention_packed(t, backend="triton", **k), qkv, cot, **kw)
    ref, ref_grad = local_run(local_attention_packed_reference, qkv.double(), cot, **kw)
    assert out.dtype == grad.dtype == torch.bfloat16
    assert_close(out, ref, BF16_OUT, "out")
    assert_close(grad, ref_grad, BF16_GRAD, "dqkv")


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_local_nan_in_masked_keys_stays_out():
    b, n, h, dh, w = 1, 60, 2, 16, 8
    qkv = torch.randn(b, n, 3, h, dh)
    mask = torch.rand(b, n) > 0.3
    poisoned = qkv.clone()
    poisoned[:, :, 1][~mask] = float("nan")
    poisoned[:, :, 2][~mask] = float("inf")
    clean = qkv.clone()
    clean[:, :, 1:][~mask] = 0.0
    kw = dict(window_size=w, causal=False, look_backward=1, look_forward=1, mask=mask)
    cot = torch.randn(b, n, h, dh)
    out, grad = local_run(lambda t, **k: local_attention_packed(t, backend="triton", **k), poisoned, cot, **kw)
    ref, ref_grad = local_run(local_attention_packed_reference, clean.double(), cot, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert_close(out, ref, F32_OUT, "out")
    assert_close(grad, ref_grad, F32_GRAD, "dqkv")
    assert torch.all(grad[:, :, 1:][~mask] == 0)


def test_local_queries_without_keys_are_zero():
    n, w = 48, 16
    qkv = torch.randn(1, n, 3, 2, 16)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[:, 16:32] = False  # causal, look_backward 0: window 1 has no key
    out, grad = local_run(lambda t, **k: local_attention_packed(t, backend="triton", **k), qkv,
                          torch.ones(1, n, 2, 16), window_size=w, causal=True, look_backward=0, mask=mask)
    assert torch.equal(out[:, 16:32], torch.zeros_like(out[:, 16:32])) and out[:, 32:].abs().sum() > 0
    assert torch.equal(grad[:, 16:32, 0], torch.zeros_like(grad[:, 16:32, 0]))


def test_local_empty_inputs():
    qkv = torch.randn(2, 0, 3, 2, 16, requires_grad=True)
    out = local_attention_packed(qkv, window_size=4, backend="triton")
    assert out.shape == (2, 0, 2, 16)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape
    assert local_attention_packed(torch.randn(0, 5, 3, 2, 16), window_size=4, backend="triton").shape == (0, 5, 2, 16)


# ---------------------------------------------------------------------------------------------
# structure: launches, one gradient tensor per packed input, block ranges


class _Counting:
    def __init__(self, kernel, log, name):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def _count_launches(monkeypatch) -> list:
    log: list = []
    for name in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        monkeypatch.setattr(A, name, _Counting(getattr(A, name), log, name))
    return log


def test_launch_counts_and_packed_gradients(monkeypatch):
    """Forward 1 launch, backward 2; the packed inputs' gradients come straight from the op's
    backward (no slice/stack/cat node between it and the leaf)."""
    log = _count_launches(monkeypatch)
    q, kv, opts = heavy_inputs(1, 20, 30, 2, 1, 16, null=True, scale=True, mask=True, causal=True)
    q.requires_grad_(), kv.requires_grad_()
    out = attention(q, kv, backend="triton", **opts)
    assert log == ["_attn_fwd_kernel"]
    assert [fn.name() for fn, _ in out.grad_fn.next_functions if fn is not None] == ["torch::autograd::AccumulateGrad"] * 2
    out.sum().backward()
    assert log == ["_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"]

    log.clear()
    qkv = torch.randn(1, 40, 3, 2, 16, requires_grad=True)
    out = local_attention_packed(qkv, window_size=8, backend="triton")
    assert [fn.name() for fn, _ in out.grad_fn.next_functions if fn is not None] == ["torch::autograd::AccumulateGrad"]
    out.sum().backward()
    assert log == ["_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"]
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()


def _covered(ranges, allowed, block, for_keys):
    """Every allowed pair lies inside its block's range; returns the range widths."""
    for blk, (lo, hi) in enumerate(ranges.tolist()):
        rows = slice(blk * block, (blk + 1) * block)
        sub = allowed[:, rows].T if for_keys else allowed[rows]
        idx = sub.any(0).nonzero().flatten()
        if len(idx):
            assert lo <= idx.min() and idx.max() < hi, f"block {blk}: [{lo}, {hi}) misses {idx.min()}..{idx.max()}"
    return [hi - lo for lo, hi in ranges.tolist()]


def _whole(ranges, allowed, block, for_keys):
    """Each block's `every` range is exactly what every one of its rows may see (where the
    kernels skip the masks); returns how many blocks have one."""
    nonempty = 0
    for blk, (lo, hi) in enumerate(ranges.tolist()):
        rows = slice(blk * block, (blk + 1) * block)
        sub = allowed[:, rows].T if for_keys else allowed[rows]
        seen_by_all = sub.all(0).nonzero().flatten().tolist()
        assert seen_by_all == list(range(lo, hi)), f"block {blk}: [{lo}, {hi}) but every row sees {seen_by_all}"
        nonempty += hi > lo
    return nonempty


@pytest.mark.parametrize(
    "n,w,lb,lf,causal,exact",
    [(1024, 128, 1, 1, False, False), (1000, 48, 2, 0, True, False), (513, 100, 0, 2, False, True),
     (300, 16, 1, 0, True, True), (129, 1, 3, 1, False, False), (77, 200, 1, 1, False, False)],
)
def test_local_block_ranges_cover_and_stay_local(n, w, lb, lf, causal, exact):
    allowed = local_allowed(n, w, lb, lf, causal, exact)
    bm, bn = 128, 64
    qr = block_ranges(n, n, block_m=bm, block_n=bn, window=(w, lb, lf, causal, exact))
    kr = block_ranges(n, n, block_m=bm, block_n=bn, window=(w, lb, lf, causal, exact), for_keys=True)
    widths = _covered(qr, allowed, bm, False)
    _covered(kr, allowed, bn, True)
    every = dict(block_m=bm, block_n=bn, window=(w, lb, lf, causal, exact), every=True)
    whole = _whole(block_ranges(n, n, **every), allowed, bm, False) + _whole(block_ranges(n, n, for_keys=True, **every),
                                                                              allowed, bn, True)
    assert whole or w < bm, "no block with tiles every row sees"
    span = bm - 1 + (lb + lf + 1) * w + w  # what a block's rows can reach
    assert max(widths) <= min(n, span)
    if (n, w, lb, lf) == (1024, 128, 1, 1):
        # a 128-query block with w = 128 and look 1/1 touches 384 keys (6 blocks of 64)
        assert widths[1:-1] == [384] * (len(widths) - 2) and widths[0] == widths[-1] == 256


def test_heavy_block_ranges_skip_later_windows():
    i, j, cq, ckv = 300, 200, 10, 8
    allowed = (torch.arange(j) // ckv)[None, :] <= (torch.arange(i) // cq)[:, None]
    qr = block_ranges(i, j, block_m=64, block_n=64, window_slots=(cq, ckv))
    kr = block_ranges(i, j, block_m=64, block_n=64, window_slots=(cq, ckv), for_keys=True)
    _covered(qr, allowed, 64, False)
    _covered(kr, allowed, 64, True)
    every = dict(block_m=64, block_n=64, window_slots=(cq, ckv), every=True)
    assert _whole(block_ranges(i, j, **every), allowed, 64, False) >= 3
    assert _whole(block_ranges(i, j, for_keys=True, **every), allowed, 64, True) >= 3
    assert qr[0].tolist() == [0, 7 * ckv]  # queries 0..63 lie in windows 0..6
    assert kr[-1].tolist() == [(192 // ckv) * cq, i]


def test_heavy_block_ranges_with_a_span():
    """kv_span K: a query block starts at the first query's (w + 1) * Ckv - K, a key block ends
    with the last query window that reaches back to it."""
    i, j, cq, ckv, span = 300, 200, 10, 8, 40
    qw, kj = torch.arange(i) // cq, torch.arange(j)
    allowed = ((kj // ckv)[None, :] <= qw[:, None]) & (kj[None, :] >= ((qw + 1) * ckv - span)[:, None])
    qr = block_ranges(i, j, block_m=64, block_n=64, window_slots=(cq, ckv), kv_span=span)
    kr = block_ranges(i, j, block_m=64, block_n=64, window_slots=(cq, ckv), kv_span=span, for_keys=True)
    widths = _covered(qr, allowed, 64, False)
    _covered(kr, allowed, 64, True)
    every = dict(block_m=64, block_n=64, window_slots=(cq, ckv), kv_span=span, every=True)
    _whole(block_ranges(i, j, **every), allowed, 64, False)
    _whole(block_ranges(i, j, for_keys=True, **every), allowed, 64, True)
    assert qr[1].tolist() == [(6 + 1) * ckv - span, (12 + 1) * ckv]  # queries 64..127: windows 6..12
    assert kr[0].tolist() == [0, ((63 + span) // ckv) * cq]  # key 63 is seen up to window 11
    assert max(widths) == span + 7 * ckv  # 64 queries touch at most 8 windows of 10 (128..191)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_span_that_reaches_slot_0_changes_nothing(backend):
    q, kv, opts = heavy_inputs(1, 40, 32, 1, 2, 16, null=True, causal=True, slots=(5, 4), seed=4)
    out = attention(q, kv, backend=backend, **opts)
    for span in (32, 10**12):  # 8 query windows of 4 key slots: 32 reach slot 0 from the last
        assert torch.equal(attention(q, kv, kv_span=span, backend=backend, **opts), out)
    assert not torch.equal(attention(q, kv, kv_span=31, backend=backend, **opts), out)


# ---------------------------------------------------------------------------------------------
# argument checks, fallback, dispatch


def test_bad_arguments_raise():
    q, kv, opts = heavy_inputs(1, 4, 5, 2, 1, 16, null=True, scale=True, mask=True, causal=True)
    cases = [
        (dict(q=q[0]), ValueError, "q must be"),
        (dict(q=q.long()), TypeError, "q must be floating"),
        (dict(kv=kv[:, :, :, :1]), ValueError, "kv must be"),
        (dict(kv=kv.double()), TypeError, "kv must have q's dtype"),
        (dict(kv=kv.new_zeros(1, 2, 5, 2, 2, 16)), ValueError, "routes"),
        (dict(null_kv=torch.zeros(2, 2, 8)), ValueError, "null_kv"),
        (dict(kv_scale=torch.zeros(1, 2, 4)), ValueError, "kv_scale"),
        (dict(kv_scale=torch.zeros(1, 2, 5, dtype=torch.long)), TypeError, "kv_scale"),
        (dict(kv_mask=torch.ones(1, 2, 5)), TypeError, "kv_mask"),
        (dict(kv_mask=torch.ones(1, 2, 6, dtype=torch.bool)), ValueError, "kv_mask"),
        (dict(kv_pos=None), ValueError, "together"),
        (dict(q_pos=opts["q_pos"].float()), TypeError, "q_pos"),
        (dict(kv_pos=opts["kv_pos"][:, :1]), ValueError, "kv_pos"),
        (dict(q_window_slots=2), ValueError, "together"),
        (dict(q_window_slots=0, kv_window_slots=2), ValueError, "q_window_slots"),
        (dict(q_window_slots=2.0, kv_window_slots=2), TypeError, "q_window_slots"),
        (dict(q_pos=None, kv_pos=None, q_window_slots=2, kv_window_slots=2), ValueError, "need q_pos"),
        (dict(kv_span=3), ValueError, "kv_span needs"),
        (dict(kv_span=0, q_window_slots=2, kv_window_slots=2), ValueError, "kv_span"),
        (dict(kv_span=2.0, q_window_slots=2, kv_window_slots=2), TypeError, "kv_span"),
        (dict(scale="x"), TypeError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]
    for change, error, match in cases:
        args = dict(q=q, kv=kv, **opts)
        args.update(change)
        args = {k: v for k, v in args.items() if v is not None}
        with pytest.raises(error, match=match):
            attention(args.pop("q"), args.pop("kv"), **args)

    qkv = torch.randn(1, 10, 3, 2, 16)
    local_cases = [
        (dict(qkv=qkv[:, :, :2]), ValueError, "qkv must be"),
        (dict(qkv=qkv.long()), TypeError, "qkv must be floating"),
        (dict(window_size=0), ValueError, "window_size"),
        (dict(window_size=2.5), TypeError, "window_size"),
        (dict(causal=True, look_forward=1), ValueError, "look_forward"),
        (dict(look_backward=-1), ValueError, "look_backward"),
        (dict(mask=torch.ones(1, 10)), TypeError, "mask"),
        (dict(mask=torch.ones(1, 9, dtype=torch.bool)), ValueError, "mask"),
        (dict(backend="flex"), ValueError, "backend"),
    ]
    for change, error, match in local_cases:
        args = dict(qkv=qkv, window_size=4)
        args.update(change)
        with pytest.raises(error, match=match):
            local_attention_packed(args.pop("qkv"), **args)


def test_head_dims_the_kernels_do_not_take():
    q, kv, _ = heavy_inputs(1, 6, 7, 1, 2, 24)
    # default backend on CPU: the reference; backend="triton" refuses
    assert_close(attention(q, kv), attention_reference(q, kv), 1e-6, "dh 24")
    with pytest.raises(ValueError, match="head dim"):
        attention(q, kv, backend="triton")
    with pytest.raises(ValueError, match="head dim"):
        local_attention_packed(torch.randn(1, 5, 3, 1, 8), window_size=2, backend="triton")
    with pytest.raises(ValueError, match="head dim"):
        attention(q.double(), kv.double(), backend="triton")
    q64, kv64, _ = heavy_inputs(1, 6, 7, 1, 2, 16, dtype=torch.float64)
    assert attention(q64, kv64).dtype == torch.float64  # the reference keeps float64


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    import colt5.kernels.runtime as runtime

    monkeypatch.setattr(runtime, "INTERPRET", False)
    q, kv, _ = heavy_inputs(1, 3, 4, 1, 1, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention(q, kv, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        local_attention_packed(torch.randn(1, 5, 3, 1, 16), window_size=2, backend="triton")


# ---------------------------------------------------------------------------------------------
# torch.compile


def _compiled_matches_eager(fn, inputs, dynamic=False):
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    results = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = f(*leaves)
        out.sum().backward()
        results.append((out, [t.grad for t in leaves if t.is_floating_point()]))
    (e_out, e_grads), (c_out, c_grads) = results
    assert_close(c_out, e_out, 1e-6, "compiled out")
    for a, e in zip(c_grads, e_grads):
        assert_close(a, e, 1e-6, "compiled grad")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    q, kv, opts = heavy_inputs(1, 20, 24, 2, 1, 16, null=True, scale=True, mask=True, causal=True, slots=(5, 6))

    def heavy(q, kv, null_kv, kv_scale, kv_mask, q_pos, kv_pos):
        return attention(q, kv, null_kv=null_kv, kv_scale=kv_scale, kv_mask=kv_mask, q_pos=q_pos, kv_pos=kv_pos,
                         q_window_slots=5, kv_window_slots=6, backend=backend)

    _compiled_matches_eager(heavy, [q, kv, opts["null_kv"], opts["kv_scale"], opts["kv_mask"], opts["q_pos"], opts["kv_pos"]])

    def light(qkv, mask):
        return local_attention_packed(qkv, window_size=8, causal=True, mask=mask, backend=backend)

    _compiled_matches_eager(light, [torch.randn(1, 30, 3, 2, 16), torch.rand(1, 30) > 0.2])


def test_compile_dynamic_shapes():
    """Dynamic shapes (what the flex path could not do): one graph serves several lengths."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def light(qkv, mask):
        return local_attention_packed(qkv, window_size=8, mask=mask, backend="triton")

    compiled = torch.compile(light, backend=counter, dynamic=True, fullgraph=True)
    for n in (30, 41):
        qkv = torch.randn(2, n, 3, 2, 16, requires_grad=True)
        mask = torch.rand(2, n) > 0.2
        out = compiled(qkv, mask)
        (grad,) = torch.autograd.grad(out.sum(), qkv)
        expected = light(qkv, mask)
        assert_close(out, expected, 1e-6, f"compiled n={n}")
        assert_close(grad, torch.autograd.grad(expected.sum(), qkv)[0], 1e-6, f"compiled grad n={n}")
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# GPU, realistic sizes (COLT5_GPU_TESTS=1 python -m pytest -q -m gpu tests/test_attention_kernel.py)


def _gpu_check(fn_triton, fn_ref, leaves, rtol_out, rtol_grad):
    cot = torch.randn_like(fn_ref(*leaves).float())
    results = []
    for fn in (fn_triton, fn_ref):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*xs)
        (out.float() * cot).sum().backward()
        results.append((out, [t.grad for t in xs]))
    (out, grads), (ref, ref_grads) = results
    assert torch.isfinite(out).all()
    assert_close(out, ref, rtol_out, "out")
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, rtol_grad, "grad")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gpu_local_bf16_n8192(causal):
    b, n, h, dh = 2, 8192, 8, 64
    qkv = torch.randn(b, n, 3, h, dh, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(b, n, device="cuda") > 0.1
    kw = dict(window_size=128, causal=causal, look_backward=1, look_forward=0 if causal else 1, mask=mask)
    _gpu_check(lambda t: local_attention_packed(t, **kw),
               lambda t: local_attention_packed_reference(t.float(), **kw).bfloat16(), [qkv], BF16_OUT, BF16_GRAD)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ["encoder", "causal-slots", "causal-slots-span"])
def test_gpu_heavy_bf16(mode):
    b, r, g, dh = 1, 2, 4, 64
    i, j = (2048, 4096) if mode == "encoder" else (8192 // 8, 8192 // 4)
    q = torch.randn(b, i, r * g, dh, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(b, r, j, 2, g, dh, device="cuda", dtype=torch.bfloat16)
    null_kv = torch.randn(2, r * g, dh, device="cuda") * 0.02
    kv_scale = torch.rand(b, r, j, device="cuda")
    opts = dict(kv_mask=torch.rand(b, r, j, device="cuda") > 0.1)
    if mode != "encoder":  # 64 heavy windows of 128 tokens: 16 query / 32 key slots each
        cq, ckv, window = i // 64, j // 64, 128
        qs, ks = torch.arange(i, device="cuda"), torch.arange(j, device="cuda")
        opts["q_pos"] = ((qs // cq) * window + (qs % cq) * (window // cq)).expand(b, i).contiguous()
        opts["kv_pos"] = ((ks // ckv) * window + (ks % ckv) * (window // ckv)).expand(b, r, j).contiguous()
        opts.update(q_window_slots=cq, kv_window_slots=ckv)
        if mode == "causal-slots-span":  # each query window sees the 200 most recent key slots
            opts["kv_span"] = 200

    def fn(ref):
        def f(q, kv, null_kv, kv_scale):
            impl = attention_reference if ref else attention
            return impl(q.float() if ref else q, kv.float() if ref else kv, null_kv=null_kv, kv_scale=kv_scale, **opts).to(q.dtype)
        return f

    _gpu_check(fn(False), fn(True), [q, kv, null_kv, kv_scale], BF16_OUT, BF16_GRAD)


@pytest.mark.gpu
@requires_cuda
def test_gpu_fp32_exact_and_compile_and_graphs():
    """fp32 (ieee dots) at fp32 tolerances; inductor fullgraph; CUDA-graph capture of f + b."""
    q, kv, opts = heavy_inputs(2, 700, 900, 2, 2, 64, null=True, scale=True, mask=True, causal=True, slots=(70, 90))
    q, kv = q.cuda(), kv.cuda()
    opts = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    cot = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    out, grads = run(lambda a, b, **kw: attention(a, b, **kw), q, kv, opts, cot)
    ref, ref_grads = run(attention_reference, q.double(), kv.double(), as_double(opts), cot)
    assert_close(out, ref, 1e-5, "fp32 out")
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, 1e-4, "fp32 grad")

    qkv = torch.randn(2, 4096, 3, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    f = torch.compile(lambda t: local_attention_packed(t, window_size=128), fullgraph=True)
    f(qkv).float().sum().backward()
    assert_close(qkv.grad, torch.autograd.grad(local_attention_packed(qkv, window_size=128).float().sum(), qkv)[0], 1e-6, "compiled")

    static = qkv.detach().clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles, allocates) outside the capture
        for _ in range(2):
            local_attention_packed(static, window_size=128).float().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):
        loss = local_attention_packed(static, window_size=128).float().sum()
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static.grad).all()
    assert math.isfinite(loss.item())
