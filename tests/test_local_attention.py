"""Local windowed attention: reference vs the `local-attention` package and a dense float64
definition, flex and triton vs reference, block-mask structure, rotary embeddings, LocalMHA.
(The Triton kernels' own tests are in test_attention_kernel.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, TOLERANCES, assert_close, local_allowed, requires_cuda

import colt5.kernels.flash_attention as attention_kernels
from colt5.local_attention import LocalMHA, _default_backend, _window_kv_blocks, _window_mask_mod, local_attention
from colt5.rotary import RotaryEmbedding, apply_rotary

# Eager flex_attention on CPU warns that it is unfused; that is the point of the CPU test.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# ---------------------------------------------------------------------------------------------
# independent definitions


def dense_local_attention(q, k, v, *, w, lb, lf, causal, exact, mask, scale=None):
    """float64 n x n attention; rows with no allowed key are zero. Also returns that row mask."""
    b, h, n, d = q.shape
    allowed = local_allowed(n, w, lb, lf, causal, exact).expand(b, 1, n, n)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    scale = d**-0.5 if scale is None else scale
    sim = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    sim = sim.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1)  # [b, 1, n]
    attn = torch.where(has_key[..., None], sim.softmax(-1), 0.0).nan_to_num()
    return torch.einsum("bhij,bhjd->bhid", attn, v.double()), has_key


def package_local_attention(q, k, v, *, w, lb, lf, causal, exact, mask):
    from local_attention import LocalAttention

    pk = LocalAttention(
        w, causal=causal, look_backward=lb, look_forward=lf, autopad=True,
        exact_windowsize=exact, use_rotary_pos_emb=False,
    )
    # An all-True mask: without one the package lets its zero autopad keys into the softmax.
    if mask is None:
        mask = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
    return pk(q, k, v, mask=mask)


LOOKS = [  # (causal, look_backward, look_forward)
    (False, 1, 1), (False, 2, 0), (False, 0, 2), (False, 0, 0),
    (True, 1, 0), (True, 2, 0), (True, 0, 0),
]


def _ids(look):
    c, lb, lf = look
    return f"{'causal' if c else 'bidir'}-lb{lb}-lf{lf}"


def _inputs(b, h, n, d, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, b, h, n, d, generator=g, dtype=torch.float64).to(dtype).unbind(0)
    mask = (torch.rand(b, n, generator=g) > 0.35) if masked else None
    return q, k, v, mask


# ---------------------------------------------------------------------------------------------
# reference backend


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "masked"])
@pytest.mark.parametrize("exact", [False, True], ids=["loose", "exact"])
@pytest.mark.parametrize("n", [64, 50, 7])
@pytest.mark.parametrize("look", LOOKS, ids=_ids)
def test_reference_matches_package_and_definition(look, n, exact, masked):
    causal, lb, lf = look
    w = 16
    q, k, v, mask = _inputs(2, 3, n, 8, torch.float64, masked, seed=n + lb)
    kw = dict(w=w, lb=lb, lf=lf, causal=causal, exact=exact, mask=mask)
    out = local_attention(q, k, v, window_size=w, causal=causal, look_backward=lb, look_forward=lf,
                          mask=mask, exact_windowsize=exact, backend="reference")
    dense, has_key = dense_local_attention(q, k, v, **kw)
    assert_close(out, dense, TOLERANCES[torch.float64][0], "reference vs dense float64")
    # The package: same everywhere except rows without any key (it returns a uniform average).
    rows = has_key[..., None]
    pkg = package_local_attention(q, k, v, **kw)
    assert_close(out * rows, pkg * rows, TOLERANCES[torch.float64][0], "reference vs package")
    # fp32 against the package in fp32.
    out32 = local_attention(q.float(), k.float(), v.float(), window_size=w, causal=causal,
                            look_backward=lb, look_forward=lf, mask=mask, exact_windowsize=exact,
                            backend="reference")
    pkg32 = package_local_attention(q.float(), k.float(), v.float(), **kw)
    assert out32.dtype == torch.float32
    assert_close(out32 * rows, pkg32 * rows, TOLERANCES[torch.float32][0], "fp32 reference vs package")


@pytest.mark.parametrize("look", [(False, 1, 1), (True, 1, 0), (False, 1, 2)], ids=_ids)
def test_reference_gradients_match_package(look):
    causal, lb, lf = look
    n, w = 45, 8
    q, k, v, mask = _inputs(2, 2, n, 8, torch.float64, True, seed=3)
    kw = dict(w=w, lb=lb, lf=lf, causal=causal, exact=False, mask=mask)
    _, has_key = dense_local_attention(q, k, v, **kw)
    cot = torch.randn(2, 2, n, 8, dtype=torch.float64) * has_key[..., None]

    def grads(fn):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        (fn(qq, kk, vv) * cot).sum().backward()
        return qq.grad, kk.grad, vv.grad

    ours = grads(lambda a, b_, c: local_attention(a, b_, c, window_size=w, causal=causal, look_backward=lb,
                                                  look_forward=lf, mask=mask, backend="reference"))
    pkg = grads(lambda a, b_, c: package_local_attention(a, b_, c, **kw))
    for name, a, e in zip("qkv", ours, pkg):
        assert_close(a, e, TOLERANCES[torch.float64][1], f"d{name}")


def test_fully_masked_rows_are_zero_with_finite_grads():
    n, w = 32, 8
    q, k, v, _ = _inputs(1, 2, n, 4, torch.float32, False)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[:, 8:16] = False  # causal, look_backward=0: window 1 has no key at all
    q.requires_grad_()
    out = local_attention(q, k, v, window_size=w, causal=True, look_backward=0, mask=mask, backend="reference")
    assert torch.all(out[:, :, 8:16] == 0) and out[:, :, 16:].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[:, :, 8:16] == 0)


def test_padding_queries_still_attend():
    # The mask masks keys only: a padding query with real keys in range gets a normal output.
    q, k, v, _ = _inputs(1, 1, 16, 4, torch.float64, False)
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[:, 5] = False
    out = local_attention(q, k, v, window_size=4, mask=mask, backend="reference")
    dense, _ = dense_local_attention(q, k, v, w=4, lb=1, lf=1, causal=False, exact=False, mask=mask)
    assert out[0, 0, 5].abs().sum() > 0
    assert_close(out, dense, 1e-10, "padding query")


def test_custom_scale():
    q, k, v, _ = _inputs(1, 2, 20, 4, torch.float64, False)
    out = local_attention(q, k, v, window_size=6, scale=0.3, backend="reference")
    dense, _ = dense_local_attention(q, k, v, w=6, lb=1, lf=1, causal=False, exact=False, mask=None, scale=0.3)
    assert_close(out, dense, 1e-10, "scale")


# ---------------------------------------------------------------------------------------------
# flex backend: block structure (pure index arithmetic) and outputs


@pytest.mark.parametrize(
    "n,w,look,exact",
    [(1024, 128, (False, 1, 1), False), (1000, 64, (False, 1, 1), False), (700, 48, (True, 2, 0), False),
     (513, 100, (False, 0, 2), True), (300, 16, (True, 1, 0), True), (129, 1, (False, 3, 1), False),
     (900, 256, (True, 1, 0), False), (77, 200, (False, 1, 1), False)],
)
def test_kv_blocks_cover_the_mask(n, w, look, exact):
    """Every (query block, kv block) pair with an allowed element is listed; every pair listed as
    full is allowed everywhere; listed-but-empty pairs are few (they only cost time)."""
    causal, lb, lf = look
    B = 128
    nb = -(-n // B)
    p_num, p_idx, f_num, f_idx = (t[0, 0] for t in _window_kv_blocks(n, w, lb, lf, causal, exact, False, torch.device("cpu")))
    listed_p = torch.zeros(nb, nb, dtype=torch.bool)
    listed_f = torch.zeros(nb, nb, dtype=torch.bool)
    for r in range(nb):
        listed_p[r, p_idx[r, : p_num[r]].long()] = True
        listed_f[r, f_idx[r, : f_num[r]].long()] = True
    assert not (listed_p & listed_f).any()
    i = torch.arange(nb * B)[:, None]
    j = torch.arange(nb * B)[None, :]
    elem = _window_mask_mod(n, w, lb, lf, causal, exact)(0, 0, i, j) & (i < n)
    tiles = elem.view(nb, B, nb, B).permute(0, 2, 1, 3).flatten(2)
    assert torch.equal(local_allowed(n, w, lb, lf, causal, exact), elem[:n, :n])
    assert not (tiles.any(-1) & ~(listed_p | listed_f)).any(), "an allowed tile is missing"
    # Rows past n are padding (sliced off), so a full tile only needs its real rows allowed.
    tiles_real = (elem | (i >= n)).view(nb, B, nb, B).permute(0, 2, 1, 3).flatten(2)
    assert tiles_real[listed_f].all(), "a tile marked full has masked elements"
    assert (listed_p & ~tiles.any(-1)).sum() <= nb, "too many empty tiles listed"
    if (n, w, look) == (1024, 128, (False, 1, 1)):
        # window 128, look 1/1: interior query blocks see exactly 3 full kv blocks, none partial
        assert torch.all(f_num[1:-1] == 3) and torch.all(p_num == 0)


@pytest.mark.parametrize(
    "n,w,look,masked",
    [(256, 128, (False, 1, 1), False), (200, 48, (True, 1, 0), True), (300, 16, (False, 2, 1), True),
     (130, 64, (True, 2, 0), False)],
)
def test_flex_matches_reference_cpu(n, w, look, masked):
    causal, lb, lf = look
    q, k, v, mask = _inputs(2, 2, n, 16, torch.float32, masked, seed=n)
    kw = dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf, mask=mask)
    ref = local_attention(q, k, v, backend="reference", **kw)
    flex = local_attention(q, k, v, backend="flex", **kw)
    assert_close(flex, ref, TOLERANCES[torch.float32][0], "flex vs reference")


@pytest.mark.parametrize(
    "n,w,look,exact,masked",
    [(100, 16, (False, 1, 1), False, False), (90, 24, (True, 1, 0), True, True), (70, 8, (False, 2, 1), True, True)],
)
def test_triton_matches_reference_cpu(n, w, look, exact, masked):
    """backend="triton" (the kernels under the interpreter; q, k, v stacked into the packed
    layout) against the float64 reference, output and gradients."""
    causal, lb, lf = look
    q, k, v, mask = _inputs(1, 2, n, 16, torch.float32, masked, seed=n)
    kw = dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf, mask=mask, exact_windowsize=exact)
    cot = torch.randn(1, 2, n, 16, dtype=torch.float64)

    def run(dtype, backend):
        qq, kk, vv = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
        out = local_attention(qq, kk, vv, backend=backend, **kw)
        (out.double() * cot).sum().backward()
        return out, qq.grad, kk.grad, vv.grad

    got, want = run(torch.float32, "triton"), run(torch.float64, "reference")
    assert got[0].shape == (1, 2, n, 16) and got[0].dtype == torch.float32
    rtol_out, rtol_grad = TOLERANCES[torch.float32]
    for name, a, e in zip(["out", "dq", "dk", "dv"], got, want):
        assert_close(a, e, rtol_out if name == "out" else rtol_grad, name)
    with pytest.raises(ValueError, match="head dim"):
        local_attention(q, k, v[..., :8], window_size=w, backend="triton")


@pytest.mark.parametrize("rotary", [False, True], ids=["packed", "rotary-packed"])
def test_local_mha_triton_matches_reference(rotary):
    """LocalMHA hands its projection (with rotary_emb, q and k rotated in the same layout) to
    local_attention_packed; both match the reference backend, output and every parameter
    gradient."""
    torch.manual_seed(2)
    mha = LocalMHA(32, window_size=8, heads=2, dim_head=16, causal=not rotary, rotary_emb=rotary, backend="triton")
    x = torch.randn(1, 29, 32)
    mask = torch.rand(1, 29) > 0.2

    def run(backend):
        mha.backend = backend
        mha.zero_grad()
        out = mha(x, mask=mask)
        out.square().sum().backward()
        return out, [p.grad.clone() for p in mha.parameters()]

    (out, grads), (ref, ref_grads) = run("triton"), run("reference")
    assert_close(out, ref, 1e-5, "LocalMHA triton")
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, 1e-4, "LocalMHA triton grads")


def test_local_mha_triton_packed_path_launches_once(monkeypatch):
    """The fast path: one kernel launch, on the projection's own [b, n, 3, h, d] layout (with
    rotary_emb too)."""
    seen = []
    real = attention_kernels.attention_fwd

    def spy(q, kv, *args):
        seen.append((tuple(q.shape), q.is_contiguous(), kv))
        return real(q, kv, *args)

    monkeypatch.setattr(attention_kernels, "attention_fwd", spy)
    for rotary_emb in (False, True):
        mha = LocalMHA(32, window_size=8, heads=2, dim_head=16, backend="triton", rotary_emb=rotary_emb)
        mha(torch.randn(2, 20, 32))
    assert seen == [((2, 20, 3, 2, 16), True, None)] * 2


@pytest.mark.parametrize("rotary_emb", [False, True])
def test_triton_path_traces_without_graph_breaks(rotary_emb):
    torch.manual_seed(0)
    mha = LocalMHA(32, window_size=8, heads=2, dim_head=16, causal=True, backend="triton", rotary_emb=rotary_emb)
    compiled = torch.compile(mha, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 19, 32)
    mask = torch.rand(2, 19) > 0.2
    with torch.no_grad():
        expected = mha(x, mask=mask)
        assert_close(compiled(x, mask=mask), expected, 1e-6, "compiled triton LocalMHA")


def test_default_backend_choice():
    cpu = torch.empty(1, 2, 3, 64)
    assert _default_backend(cpu, 64) == "reference"
    if not HAS_CUDA:
        return
    assert _default_backend(cpu.cuda().bfloat16(), 64) == "triton"
    assert _default_backend(torch.empty(1, 2, 3, 256, device="cuda"), 256) == "flex"
    assert _default_backend(torch.empty(1, 2, 3, 24, device="cuda"), 24) == "reference"
    assert _default_backend(cpu.cuda(), 32) == "flex"  # e != d: not the packed kernels


@requires_cuda
@pytest.mark.parametrize("backend", ["flex", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "n,w,look,masked",
    [(1024, 128, (False, 1, 1), False), (1000, 64, (True, 1, 0), True), (777, 48, (False, 2, 1), True)],
)
def test_flex_matches_reference_cuda(n, w, look, masked, dtype, backend):
    causal, lb, lf = look
    q, k, v, mask = (t.cuda() if t is not None else None for t in _inputs(2, 4, n, 64, dtype, masked, seed=n))
    kw = dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf, mask=mask)
    cot = torch.randn_like(q)

    def run(backend):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = local_attention(qq, kk, vv, backend=backend, **kw)
        (out.float() * cot.float()).sum().backward()
        return out, qq.grad, kk.grad, vv.grad

    rtol_out, rtol_grad = TOLERANCES[dtype] if dtype != torch.float32 else (1e-4, 1e-3)
    for name, a, e in zip(["out", "dq", "dk", "dv"], run(backend), run("reference")):
        assert_close(a, e, rtol_out if name == "out" else rtol_grad, name)


# ---------------------------------------------------------------------------------------------
# rotary


def test_rotary_scores_depend_only_on_position_difference():
    rot = RotaryEmbedding(32)
    q, k = torch.randn(2, 32, dtype=torch.float64).unbind(0)
    pos_q = torch.tensor([5, 70, 1000, 3])
    pos_k = torch.tensor([2, 60, 1003, 3])
    shift = 1000  # fp32 angles at positions ~1e4 round to ~1e-3 rad; keep them smaller

    def score(pq, pk):
        fq, fk = rot(pq), rot(pk)  # [4, 16]
        qq = apply_rotary(q.float().expand(len(pq), 32), fq)
        kk = apply_rotary(k.float().expand(len(pk), 32), fk)
        return (qq.double() * kk.double()).sum(-1)

    s0 = score(pos_q, pos_k)
    assert_close(score(pos_q + shift, pos_k + shift), s0, 1e-4, "shifted scores")
    # and not a constant: different offsets give different scores
    assert (s0[0] - score(pos_q[:1], pos_k[:1] + 1)).abs() > 1e-3
    # rotation keeps norms
    x = torch.randn(4, 32)
    assert_close(apply_rotary(x, rot(pos_q)).norm(dim=-1), x.norm(dim=-1), 1e-5, "norm")


def test_rotary_gathered_positions_equal_full_application():
    b, h, n, d, kk = 2, 3, 50, 16, 7
    rot = RotaryEmbedding(d)
    x = torch.randn(b, h, n, d)
    full = apply_rotary(x, rot(torch.arange(n)))  # freqs [n, d/2], shared
    idx = torch.stack([torch.randperm(n)[:kk] for _ in range(b)])  # [b, k] original positions
    gathered = x.gather(2, idx[:, None, :, None].expand(b, h, kk, d))
    ours = apply_rotary(gathered, rot(idx))  # freqs [b, k, d/2]: heads dim broadcast
    expected = full.gather(2, idx[:, None, :, None].expand(b, h, kk, d))
    assert_close(ours, expected, 1e-6, "gathered rotary")
    # [b, n, d] tensors (no heads) take [b, n, d/2] freqs directly
    y = torch.randn(b, kk, d)
    assert_close(apply_rotary(y, rot(idx))[0], apply_rotary(y[0], rot(idx[0])), 1e-6, "no heads dim")


def test_rotary_partial_and_dtype_and_errors():
    rot = RotaryEmbedding(8)
    x = torch.randn(1, 2, 5, 12, dtype=torch.bfloat16)
    y = apply_rotary(x, rot(torch.arange(5)))
    assert y.dtype == torch.bfloat16 and torch.equal(y[..., 8:], x[..., 8:])
    assert not torch.equal(y[..., 1:, :8], x[..., 1:, :8])
    with pytest.raises(ValueError, match="dim_head"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="rotate"):
        apply_rotary(torch.randn(5, 4), rot(torch.arange(5)))
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(torch.randn(6, 8), rot(torch.arange(5)))
    with pytest.raises(TypeError, match="positions"):
        rot(torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# LocalMHA and argument checks


def test_local_mha_shapes_mask_causality_grads():
    torch.manual_seed(0)
    mha = LocalMHA(32, window_size=8, heads=2, dim_head=16, causal=True, rotary_emb=True)
    x = torch.randn(2, 37, 32, requires_grad=True)
    mask = torch.rand(2, 37) > 0.2
    out = mha(x, mask=mask)
    assert out.shape == (2, 37, 32) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mha.parameters())
    # causal: changing the future leaves the past alone
    x2 = x.detach().clone()
    x2[:, 20:] = torch.randn(2, 17, 32)
    assert torch.allclose(mha(x2, mask=mask)[:, :20], out[:, :20].detach(), atol=1e-6)
    # a masked key does not matter
    x3 = x.detach().clone()
    m = torch.ones(2, 37, dtype=torch.bool)
    m[:, 3] = False
    x3[:, 3] += 5.0
    keep = torch.arange(37) != 3
    assert torch.allclose(mha(x3, mask=m)[:, keep], mha(x.detach(), mask=m)[:, keep], atol=1e-5)


def test_local_mha_matches_manual_composition():
    torch.manual_seed(1)
    mha = LocalMHA(24, window_size=5, heads=3, dim_head=8, look_backward=2, look_forward=1)
    x = torch.randn(1, 23, 24)
    q, k, v = mha.to_qkv(x).view(1, 23, 3, 3, 8).permute(2, 0, 3, 1, 4)
    dense, _ = dense_local_attention(q, k, v, w=5, lb=2, lf=1, causal=False, exact=False, mask=None)
    expected = mha.to_out(dense.float().transpose(1, 2).reshape(1, 23, 24))
    assert_close(mha(x), expected, 1e-5, "LocalMHA")


def test_argument_errors():
    q = torch.randn(1, 2, 10, 4)
    ok = dict(window_size=4)
    with pytest.raises(ValueError, match="q must be"):
        local_attention(q[0], q[0], q[0], **ok)
    with pytest.raises(ValueError, match="same shape"):
        local_attention(q, q[:, :1], q, **ok)
    with pytest.raises(ValueError, match="window_size"):
        local_attention(q, q, q, window_size=0)
    with pytest.raises(TypeError, match="window_size"):
        local_attention(q, q, q, window_size=4.0)
    with pytest.raises(ValueError, match="look_forward"):
        local_attention(q, q, q, window_size=4, causal=True, look_forward=1)
    with pytest.raises(ValueError, match="look_backward"):
        local_attention(q, q, q, window_size=4, look_backward=-1)
    with pytest.raises(TypeError, match="mask"):
        local_attention(q, q, q, mask=torch.ones(1, 10), **ok)
    with pytest.raises(ValueError, match="mask"):
        local_attention(q, q, q, mask=torch.ones(1, 9, dtype=torch.bool), **ok)
    with pytest.raises(ValueError, match="backend"):
        local_attention(q, q, q, backend="nope", **ok)
    with pytest.raises(TypeError, match="dtype"):
        local_attention(q, q.double(), q, **ok)
    with pytest.raises(TypeError, match="floating"):
        local_attention(q.long(), q.long(), q.long(), **ok)
    with pytest.raises(ValueError, match="window_size"):
        LocalMHA(8, window_size=0)
    with pytest.raises(ValueError, match="x must be"):
        LocalMHA(8, window_size=4, heads=1, dim_head=4)(torch.randn(1, 5, 7))
    assert local_attention(q[:, :, :0], q[:, :, :0], q[:, :, :0], **ok).shape == (1, 2, 0, 4)


def test_default_backend_is_reference_on_cpu():
    if HAS_CUDA:
        pytest.skip("checks the CPU default")
    q, k, v, _ = _inputs(1, 1, 20, 4, torch.float64, False)
    assert torch.equal(local_attention(q, k, v, window_size=4), local_attention(q, k, v, window_size=4, backend="reference"))


def test_flex_path_traces_without_graph_breaks():
    """Layers get compiled with fullgraph=True; on CUDA LocalMHA takes the flex path, whose block
    mask cache (miss and hit) must trace without a graph break. aot_eager: CPU inductor has no
    flex lowering for every case, and dynamo tracing is what is checked here."""
    import colt5.local_attention as la_module

    torch.manual_seed(0)
    mha = LocalMHA(32, window_size=8, heads=2, dim_head=16, causal=True, rotary_emb=True, backend="flex")
    compiled = torch.compile(mha, fullgraph=True, backend="aot_eager")
    la_module._block_mask_cache.clear()
    with torch.no_grad():
        for n in (19, 19):  # a cache miss, then a hit
            x = torch.randn(2, n, 32)
            mask = torch.rand(2, n) > 0.2
            mha.backend = "reference"
            expected = mha(x, mask=mask)
            mha.backend = "flex"
            assert_close(compiled(x, mask=mask), expected, 1e-5, f"compiled flex n={n}")


def test_kv_blocks_trace_without_graph_break():
    """Under torch.compile the block mask is built inside the graph (no .item(), static shapes),
    so a compiled, CUDA-graphed block never caches a tensor a replay would overwrite."""
    args = (5000, 128, 1, 1, False, False, False, torch.device("cpu"))
    traced = torch.compile(lambda: _window_kv_blocks(*args), fullgraph=True, backend="eager")()
    for got, want in zip(traced, _window_kv_blocks(*args)):
        assert torch.equal(got, want)
