"""Soft top-k: reference vs the literal iteration, Triton (interpreter on CPU) vs float64 reference.

The Triton cases force tiny chunks and splits so that streaming and the multi-launch split path
run on rows of a few hundred elements.
"""

import importlib

import pytest
import torch

from colt5 import coor_descent
from colt5.kernels import coor_descent_reference, triton_coor_descent
from conftest import TOLERANCES, assert_close, literal_coor_descent

cd = importlib.import_module("colt5.kernels.coor_descent")


pytestmark = pytest.mark.usefixtures("poisoned_kernels")


def _inputs(rows, n, *, density, per_row_k, k, dtype=torch.float32, empty_rows=()):
    s = torch.randn(rows, n, dtype=torch.float64).to(dtype)
    mask = torch.rand(rows, n) < density if density < 1 else None
    if empty_rows:
        mask = torch.ones(rows, n, dtype=torch.bool) if mask is None else mask
        mask[list(empty_rows)] = False
    if per_row_k:
        # fractional k: k equal to a row's valid count puts s + a on the relu kink exactly
        k = torch.rand(rows, dtype=torch.float64) * n / 2 + 0.3
    return s, mask, k


@pytest.mark.parametrize("n_iters,eps_init,eps_decay", [(1, None, 1.0), (7, 3.0, 0.6), (20, None, 1.0)])
def test_reference_matches_literal_iteration(n_iters, eps_init, eps_decay, seeded):
    s, mask, k = _inputs(5, 40, density=0.7, per_row_k=True, k=None, dtype=torch.float64)
    mask[:, 0] = True  # the literal form has no fully masked rows
    s.requires_grad_()
    k.requires_grad_()
    cfg = dict(n_iters=n_iters, eps=0.2, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    g = torch.randn_like(s)
    y = coor_descent_reference(s, k=k, **cfg)
    ds, dk = torch.autograd.grad(y, (s, k), g)
    _, y_lit = literal_coor_descent(s, k=k, **cfg)
    ds_lit, dk_lit = torch.autograd.grad(y_lit, (s, k), g)
    assert_close(y, y_lit, 1e-12, "y")
    assert_close(ds, ds_lit, 1e-10, "ds")
    assert_close(dk, dk_lit, 1e-10, "dk")


# (rows, n, mask density, per-row k, k, n_iters, eps, eps_init, eps_decay, dtype, empty rows, forced plan)
CASES = {
    "rows2-n1-k0.4": (2, 1, 1.0, False, 0.4, 20, 0.1, None, 1.0, torch.float32, (), {}),
    "rows3-n2-masked-k0.7": (3, 2, 0.6, False, 0.7, 2, 0.1, None, 1.0, torch.float32, (), {}),
    "rows4-n63-masked-rowk-scaled": (4, 63, 0.5, True, None, 20, 0.05, 2.0, 0.7, torch.float32, (), {}),
    "rows3-n257-dense-iters1": (3, 257, 1.0, False, 30.5, 1, 0.1, None, 1.0, torch.float32, (), {}),
    "rows3-n257-sparse-iters2": (3, 257, 0.1, False, 5.5, 2, 0.1, 1.0, 0.5, torch.float32, (), {}),
    "rows3-n63-k-above-n": (3, 63, 0.8, False, 100.0, 20, 0.1, None, 1.0, torch.float32, (), {}),
    "rows4-n100-empty-rows-rowk": (4, 100, 0.7, True, None, 20, 0.1, 1.0, 0.8, torch.float32, (1, 3), {}),
    "rows3-n257-masked-bf16": (3, 257, 0.7, False, 20.5, 20, 0.1, 2.0, 0.8, torch.bfloat16, (), {}),
    "rows2-n300-streamed-rowk": (2, 300, 0.7, True, None, 6, 0.1, 2.0, 0.6, torch.float32, (1,), {"block_n": 64}),
    "rows3-n300-split-streamed": (3, 300, 0.7, True, None, 6, 0.1, 2.0, 0.6, torch.float32, (2,), {"block_n": 64, "split_len": 128}),
    "rows2-n200-split-regs-k-above-n": (2, 200, 0.5, False, 150.5, 3, 0.2, None, 1.0, torch.float32, (), {"split_len": 32}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_float64_reference(case, seeded):
    rows, n, density, per_row_k, k, n_iters, eps, eps_init, eps_decay, dtype, empty, force = CASES[case]
    cd._FORCE.update(force)
    s, mask, k = _inputs(rows, n, density=density, per_row_k=per_row_k, k=k, dtype=dtype, empty_rows=empty)
    cfg = dict(n_iters=n_iters, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    s.requires_grad_()
    inputs = (s,)
    k_tri = k
    if per_row_k:
        k_tri = k.float().requires_grad_()
        inputs = (s, k_tri)
    y = triton_coor_descent(s, k=k_tri, **cfg)
    assert y.dtype == dtype
    g = torch.randn(rows, n, dtype=torch.float64)
    grads = torch.autograd.grad(y, inputs, g.to(dtype))

    s64 = s.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_() if per_row_k else k
    y64 = coor_descent_reference(s64, k=k64, **cfg)
    grads64 = torch.autograd.grad(y64, (s64, k64) if per_row_k else (s64,), g)

    rtol_y, rtol_g = TOLERANCES[dtype]
    assert_close(y, y64, rtol_y, "y")
    for name, got, want in zip(("ds", "dk"), grads, grads64):
        assert_close(got, want, rtol_g, name)
    if empty:
        assert (y[list(empty)] == 0).all() and (grads[0][list(empty)] == 0).all()


def test_forward_without_grad_skips_the_autograd_node(seeded):
    """Inference (nothing requires grad, or no_grad) runs the launchers without an autograd
    Function, with bitwise the values of the differentiable path."""
    from colt5.kernels import coor_descent_offset

    s = torch.randn(3, 50)
    mask = torch.rand(3, 50) > 0.3
    k = torch.rand(3) * 5 + 1
    cfg = dict(n_iters=5, eps=0.1, eps_init=1.0, eps_decay=0.7, mask=mask)
    y_grad = triton_coor_descent(s.clone().requires_grad_(), k=k, **cfg)
    a_grad, _ = coor_descent_offset(s, k=k.clone().requires_grad_(), backend="triton", **cfg)
    assert y_grad.grad_fn is not None and a_grad.grad_fn is not None
    with torch.no_grad():
        y_nograd = triton_coor_descent(s.clone().requires_grad_(), k=k, **cfg)
    y_plain = triton_coor_descent(s, k=k, **cfg)
    a_plain, _ = coor_descent_offset(s, k=k, backend="triton", **cfg)
    for got, want in ((y_nograd, y_grad), (y_plain, y_grad), (a_plain, a_grad)):
        assert got.grad_fn is None and torch.equal(got, want.detach())


def test_library_op_path_and_opcheck(seeded):
    """The op torch.compile sees: same numbers in eager, and torch.library's own checks."""
    s = torch.randn(3, 40, requires_grad=True)
    k = (torch.rand(3) * 10 + 1).requires_grad_()
    mask = torch.rand(3, 40) > 0.3
    cfg = dict(n_iters=5, eps=0.1, eps_init=1.0, eps_decay=0.7, mask=mask)
    y_fn = triton_coor_descent(s, k=k, **cfg)
    grads_fn = torch.autograd.grad(y_fn.square().sum(), (s, k))
    cd._EAGER_VIA_OP = True
    y_op = triton_coor_descent(s, k=k, **cfg)
    grads_op = torch.autograd.grad(y_op.square().sum(), (s, k))
    assert torch.equal(y_fn, y_op)
    assert all(torch.equal(a, b) for a, b in zip(grads_fn, grads_op))
    args = (s.detach().requires_grad_(), mask, k.detach().requires_grad_(), 1.0, 3, 0.1, 0.5, 0.9)
    torch.library.opcheck(
        torch.ops.colt5.coor_descent_fwd.default, args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, seeded):
    s = torch.randn(4, 33, requires_grad=True)
    mask = torch.rand(4, 33) > 0.2

    def routed(x):
        return coor_descent(x.tanh() * 3, n_iters=4, k=5.5, eps=0.1, mask=mask, backend=backend) * 2

    compiled = torch.compile(routed, fullgraph=True, backend="inductor" if backend == "reference" else "aot_eager")
    y = compiled(s)
    (ds,) = torch.autograd.grad(y.sum(), s)
    y_eager = routed(s)
    (ds_eager,) = torch.autograd.grad(y_eager.sum(), s)
    assert_close(y, y_eager, 1e-5, "y")
    assert_close(ds, ds_eager, 1e-4, "ds")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_finite_scores(backend, seeded):
    """+inf takes weight 1, -inf and NaN weight 0 (as if masked); gradients finite; no hang."""
    s = torch.randn(3, 20)
    s[0, 3], s[0, 7], s[1, 0], s[1, 5] = float("inf"), float("-inf"), float("nan"), float("inf")
    s[2] = float("nan")
    s.requires_grad_()
    y = coor_descent(s, n_iters=10, k=4.5, backend=backend)
    (ds,) = torch.autograd.grad(y.sum() + (y * torch.arange(20.0)).sum(), s)
    assert torch.isfinite(y).all() and torch.isfinite(ds).all()
    assert y[0, 3] == 1 and y[1, 5] == 1
    assert y[0, 7] == 0 and y[1, 0] == 0 and (y[2] == 0).all()
    assert ds[0, 3] == 0 and ds[0, 7] == 0 and ds[1, 0] == 0 and (ds[2] == 0).all()
    finite = s.detach().clone()
    mask = torch.isfinite(finite) | (finite == float("inf"))
    finite[~mask] = 0.0
    expected = coor_descent_reference(finite.double(), n_iters=10, k=4.5, mask=mask)
    assert_close(y, expected, 1e-5, "y vs masked")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(cd, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_coor_descent(torch.randn(2, 5), n_iters=2, k=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        coor_descent(torch.randn(2, 5), n_iters=2, k=1, backend="triton")


S = torch.randn(2, 6)
BAD = {
    "n_iters0": (dict(n_iters=0), ValueError, "n_iters"),
    "n_iters-float": (dict(n_iters=2.0), TypeError, "n_iters"),
    "k0": (dict(k=0), ValueError, "k"),
    "k-negative": (dict(k=-1.5), ValueError, "k"),
    "k-tensor-nonpositive": (dict(k=torch.tensor([1.0, 0.0])), ValueError, "k"),
    "k-tensor-shape": (dict(k=torch.ones(3)), ValueError, "k"),
    "k-string": (dict(k="2"), TypeError, "k"),
    "eps0": (dict(eps=0.0), ValueError, "eps"),
    "eps_init-negative": (dict(eps_init=-1.0), ValueError, "eps_init"),
    "eps_decay0": (dict(eps_decay=0.0), ValueError, "eps_decay"),
    "eps_decay-above-1": (dict(eps_decay=1.5), ValueError, "eps_decay"),
    "mask-shape": (dict(mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "mask"),
    "mask-dtype": (dict(mask=torch.ones(2, 6)), TypeError, "mask"),
    "mask-device": (dict(mask=torch.ones(2, 6, dtype=torch.bool, device="meta")), ValueError, "mask must be on"),
    "s-int": (dict(s=torch.ones(2, 6, dtype=torch.long)), TypeError, "s"),
    "s-not-tensor": (dict(s=[[1.0, 2.0]]), TypeError, "s"),
}


@pytest.mark.parametrize("fn", [coor_descent, triton_coor_descent], ids=["coor_descent", "triton_coor_descent"])
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arguments(fn, case):
    kwargs, error, name = BAD[case]
    kwargs = {"s": S, "n_iters": 3, "k": 2.0, **kwargs}
    s = kwargs.pop("s")
    with pytest.raises(error, match=name):
        fn(s, **kwargs)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        coor_descent(S, n_iters=2, k=1, backend="cuda")


def test_launcher_key_separates_what_triton_specializes_on():
    """The direct launch reuses a compiled kernel only for arguments with the same key, so the
    key must tell apart everything Triton specializes on (the GPU tests check it against the JIT)."""
    from colt5.kernels.launch import arg_key

    buf = torch.zeros(64)
    assert arg_key(buf) == arg_key(buf[4:])  # 16-byte offset: still aligned
    assert arg_key(buf) != arg_key(buf[1:])  # 4-byte offset: not
    assert arg_key(buf) != arg_key(buf.double())
    assert arg_key(1) != arg_key(3) and arg_key(16) != arg_key(17) and arg_key(3) == arg_key(5)
    assert arg_key(2**31 - 16) != arg_key(2**31) != arg_key(2**63)
    assert arg_key(0.5) == arg_key(3.0)
    with pytest.raises(TypeError, match="str"):
        arg_key("x")


def test_launcher_keeps_the_jits_kernel_and_launches_it_directly(monkeypatch):
    """Launcher logic with stand-ins for Triton's JIT and driver (the GPU tests run the real
    ones): a key's first call goes through the JIT with spec(key)'s constexprs and warps; later
    calls launch the kept kernel with the grid, the current stream, raw addresses for the
    leading tensors, the other arguments and the constexprs, and never call spec; a kernel
    without scratch buffers goes straight to its launcher's C entry point; a registered launch
    hook sends calls back through the JIT (which calls the hooks)."""
    from types import SimpleNamespace

    knobs = pytest.importorskip("triton.knobs")  # launch hooks: triton >= 3.4
    launch = importlib.import_module("colt5.kernels.launch")
    runs, c_launches, jit_calls, spec_calls = [], [], [], []

    class Compiled:  # a launcher without the C entry point: kernel.run is called
        function, packed_metadata = "function", "metadata"

        def run(self, *args):
            runs.append(args)

    class CompiledC(Compiled):  # Triton's CUDA launcher: run.launch is the C entry point
        run = SimpleNamespace(launch=lambda *args: c_launches.append(args), launch_cooperative_grid=False,
                              launch_pdl=True, global_scratch_size=0, profile_scratch_size=0)

    class JitFunction:
        arg_names, constexprs = ["x", "y", "n", "BLOCK"], [3]

        def __getitem__(self, grid):
            compiled = CompiledC if grid[0] == 4 else Compiled
            return lambda *args, **kw: jit_calls.append((grid, args, kw)) or compiled()

    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 1234)
    launcher = launch.Launcher(JitFunction())
    x, y = torch.zeros(4), torch.ones(4)

    def spec(key):
        spec_calls.append(key)
        return {"BLOCK": 16}, 4

    launcher.keyed("key", (2, 1, 1), (x, y, 7), spec)
    assert jit_calls == [((2, 1, 1), (x, y, 7), {"BLOCK": 16, "num_warps": 4})] and runs == []
    launcher.keyed("key", (3, 1, 1), (y, x, 9), spec)
    assert len(jit_calls) == 1 and spec_calls == ["key"]
    assert runs == [(3, 1, 1, 1234, "function", "metadata", None, None, None, y.data_ptr(), x.data_ptr(), 9, 16)]
    launcher.keyed("other key", (3, 1, 1), (y, x, 9), spec)
    assert len(jit_calls) == 2  # a new key compiles (or finds) its own kernel

    launcher.keyed("c key", (4, 1, 1), (x, y, 7), spec)
    launcher.keyed("c key", (5, 1, 1), (y, x, 9), spec)
    assert c_launches == [(5, 1, 1, 1234, "function", False, True, None, None, "metadata", None, None, None,
                           y.data_ptr(), x.data_ptr(), 9, 16)]

    launcher((5,), (x, y, 3), {"BLOCK": 8}, 2)  # keys built from the arguments; grid padded
    launcher((5,), (y, x, 5), {"BLOCK": 8}, 2)  # same key (ints 3, 5: same class)
    assert jit_calls[-1][0] == (5, 1, 1) and len(jit_calls) == 4 and runs[-1][:3] == (5, 1, 1)

    assert not launch._launch_hooks_set()
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert launch._launch_hooks_set()
        launcher.keyed("key", (3, 1, 1), (y, x, 9), spec)
        assert len(jit_calls) == 5 and len(runs) == 2
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


def test_split_buffers_kept_per_stream_and_fresh_under_capture(monkeypatch):
    """The keeping logic of the split rows' buffers, with the CUDA calls stood in for (the GPU
    tests run the kernels on them): eager calls on one stream and n_splits share one entry that
    only grows, another stream or n_splits gets its own, a non-cooperative plan gets no counters,
    and a call under CUDA-graph capture gets new buffers and keeps nothing."""
    stream, capturing = [1], [False]
    monkeypatch.setattr(cd, "_current_stream", lambda index: stream[0])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(cd, "_new_split_buffers", lambda device, n_partials, n_counters: (
        torch.empty(n_partials), torch.zeros(n_counters, dtype=torch.int64)))
    monkeypatch.setattr(cd, "_SPLIT_BUFFERS", {})
    gpu = torch.device("cuda", 0)

    def plan(rows, n_splits, cooperative=True):
        return cd._Plan(rows, n_splits * 4096, 4096, 4096, n_splits, cooperative, 8, n_splits)

    part, counters = cd._split_buffers(gpu, plan(2, 16), 100, True)
    assert part.numel() == 100 and counters.numel() == 2 and counters.dtype == torch.int64
    again = cd._split_buffers(gpu, plan(2, 16), 60, True)
    assert again[0] is part and again[1] is counters
    grown = cd._split_buffers(gpu, plan(3, 16), 80, True)  # more rows: new, larger counters
    assert grown[0].numel() == 100 and grown[1].numel() == 3
    assert cd._split_buffers(gpu, plan(2, 16), 100, True)[1] is grown[1]
    assert cd._split_buffers(gpu, plan(2, 16, cooperative=False), 100, True) == (grown[0], None)
    assert cd._split_buffers(gpu, plan(2, 8), 10, True)[0] is not grown[0]
    stream[0] = 2
    assert cd._split_buffers(gpu, plan(2, 16), 100, True)[0] is not grown[0]
    assert sorted(cd._SPLIT_BUFFERS) == [(0, 1, 8), (0, 1, 16), (0, 2, 16)]
    stream[0] = 1
    fresh = cd._split_buffers(gpu, plan(2, 16), 100, False)  # the library op's calls
    assert fresh[0] is not grown[0] and fresh[1] is not grown[1]
    capturing[0] = True
    first, second = (cd._split_buffers(gpu, plan(2, 16), 100, True) for _ in range(2))
    assert first[0] is not second[0] and first[1] is not second[1] and len(cd._SPLIT_BUFFERS) == 3
    assert cd._split_buffers(torch.device("cpu"), plan(2, 16, cooperative=False), 7, True)[1] is None


def test_only_eager_forwards_keep_split_buffers(monkeypatch):
    """The eager forward asks to keep its split buffers; the library op (what torch.compile
    runs, inside cudagraph trees too) and a backward without the forward's scratch do not."""
    asked = []
    real = cd._split_buffers
    monkeypatch.setattr(cd, "_split_buffers", lambda device, plan, n_partials, keep: asked.append(keep)
                        or real(device, plan, n_partials, keep))
    monkeypatch.setattr(cd, "_FORCE", {"split_len": 64})
    s = torch.randn(2, 200, requires_grad=True)
    for via_op in (False, True):
        monkeypatch.setattr(cd, "_EAGER_VIA_OP", via_op)
        asked.clear()
        y = triton_coor_descent(s, n_iters=3, k=20.0)
        torch.autograd.grad(y, s, torch.randn_like(y))
        assert asked == ([False, False] if via_op else [True])
