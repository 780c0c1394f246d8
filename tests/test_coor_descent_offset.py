"""coor_descent_offset: the dual offset a_T of soft top-k and its gradient.

Reference vs an independent float64 literal iteration; Triton (interpreter on CPU, tiny forced
chunks and splits) vs the float64 reference, for a_T and for gradients of losses that use a_T
alone, and y and a_T together (the launchers directly); the op path under torch.compile.
"""

import importlib

import pytest
import torch

from colt5.kernels import coor_descent_offset, coor_descent_offset_reference, coor_descent_reference
from colt5.kernels.checks import eps_schedule
from conftest import assert_close, literal_coor_descent

cd = importlib.import_module("colt5.kernels.soft_topk")


pytestmark = pytest.mark.usefixtures("poisoned")


def _inputs(rows, n, *, density, per_row_k, k, empty_rows=(), dtype=torch.float64):
    s = torch.randn(rows, n, dtype=torch.float64) * 1.5
    mask = torch.rand(rows, n) < density
    mask[:, 0] = True
    mask[list(empty_rows)] = False
    if per_row_k:
        k = torch.rand(rows, dtype=torch.float64) * n / 3 + 0.3
    return s.to(dtype), mask, k


@pytest.mark.parametrize("n_iters,eps_init,eps_decay", [(1, None, 1.0), (6, 3.0, 0.6), (20, None, 1.0)])
def test_reference_matches_literal_iteration(n_iters, eps_init, eps_decay, seeded):
    s, mask, k = _inputs(4, 30, density=0.7, per_row_k=True, k=None)
    s.requires_grad_()
    k.requires_grad_()
    cfg = dict(n_iters=n_iters, eps=0.2, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    ga, gy = torch.randn(4, 1, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64)

    a, e = coor_descent_offset_reference(s, k=k, **cfg)
    y = coor_descent_reference(s, k=k, **cfg)
    assert a.dtype == torch.float64 and a.shape == (4, 1) and e == eps_schedule(n_iters, 0.2, eps_init, eps_decay)[-1]
    grads = torch.autograd.grad((a * ga).sum() + (y * gy).sum(), (s, k))
    a_lit, y_lit = literal_coor_descent(s, k=k, **cfg)
    grads_lit = torch.autograd.grad((a_lit * ga).sum() + (y_lit * gy).sum(), (s, k))
    assert_close(a, a_lit, 1e-12, "a")
    assert_close(y, y_lit, 1e-12, "y")
    # the offset reproduces y
    assert_close(torch.exp((s + a).clamp_max(0) / e) * mask, y, 1e-12, "y from a")
    for name, got, want in zip(("ds", "dk"), grads, grads_lit):
        assert_close(got, want, 1e-10, name)


def test_reference_empty_rows_zero_offset_and_grad(seeded):
    s, mask, k = _inputs(3, 10, density=0.6, per_row_k=True, k=None, empty_rows=(1,))
    s.requires_grad_()
    k.requires_grad_()
    a, _ = coor_descent_offset_reference(s, n_iters=5, k=k, mask=mask)
    ds, dk = torch.autograd.grad(a.sum(), (s, k))
    assert a[1].item() == 0 and (ds[1] == 0).all() and dk[1] == 0
    assert torch.isfinite(a).all() and torch.isfinite(ds).all() and ds[0].abs().sum() > 0


# (rows, n, mask density, per-row k, k, n_iters, eps, eps_init, eps_decay, empty rows, forced plan)
CASES = {
    "rows3-n1-k0.4": (3, 1, 1.0, False, 0.4, 20, 0.1, None, 1.0, (), {}),
    "rows4-n63-masked-rowk-scaled": (4, 63, 0.5, True, None, 20, 0.05, 2.0, 0.7, (), {}),
    "rows3-n257-sparse-iters2": (3, 257, 0.1, False, 5.5, 2, 0.1, 1.0, 0.5, (), {}),
    "rows3-n40-iters1": (3, 40, 0.8, False, 5.5, 1, 0.1, None, 1.0, (), {}),
    "rows4-n100-empty-rows-rowk": (4, 100, 0.7, True, None, 20, 0.1, 1.0, 0.8, (1, 3), {}),
    "rows3-n300-streamed-rowk-empty": (3, 300, 0.7, True, None, 6, 0.1, 2.0, 0.6, (1,), {"block_n": 64}),
    "rows3-n300-split-streamed-rowk-empty": (3, 300, 0.7, True, None, 6, 0.1, 2.0, 0.6, (2,), {"block_n": 64, "split_len": 128}),
    "rows2-n200-split-regs": (2, 200, 0.5, False, 20.5, 3, 0.2, None, 1.0, (), {"split_len": 32}),
}


def _run_case(case, force_plan):
    rows, n, density, per_row_k, k, n_iters, eps, eps_init, eps_decay, empty, force = CASES[case]
    force_plan(**force)
    s64, mask, k64 = _inputs(rows, n, density=density, per_row_k=per_row_k, k=k, empty_rows=empty)
    cfg = dict(n_iters=n_iters, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    return s64, k64, cfg, per_row_k, empty


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_offset_matches_float64_reference(case, seeded, force_plan):
    s64, k64, cfg, per_row_k, empty = _run_case(case, force_plan)
    s = s64.float().requires_grad_()
    k = k64.float().requires_grad_() if per_row_k else k64
    a, e = coor_descent_offset(s, k=k, backend="triton", **cfg)
    assert a.dtype == torch.float32 and a.shape == (s.shape[0], 1)
    ga = torch.randn_like(a, dtype=torch.float64)
    grads = torch.autograd.grad(a, (s, k) if per_row_k else (s,), ga.float())

    s_ref = s64.clone().requires_grad_()
    k_ref = k64.clone().requires_grad_() if per_row_k else k64
    a_ref, e_ref = coor_descent_offset_reference(s_ref, k=k_ref, **cfg)
    # + 0 * sum(s): with one iteration and a fixed k, a_T does not depend on s at all
    loss_ref = (a_ref * ga).sum() + 0 * s_ref.sum()
    grads_ref = torch.autograd.grad(loss_ref, (s_ref, k_ref) if per_row_k else (s_ref,))
    assert e == e_ref
    assert_close(a, a_ref, 1e-5, "a")
    for name, got, want in zip(("ds", "dk"), grads, grads_ref):
        assert_close(got, want, 1e-4, name)
    if empty:
        assert (a[list(empty)] == 0).all() and (grads[0][list(empty)] == 0).all()
        if per_row_k:
            assert (grads[1][list(empty)] == 0).all()


@pytest.mark.parametrize(
    "case", ["rows4-n100-empty-rows-rowk", "rows3-n300-split-streamed-rowk-empty", "rows2-n200-split-regs"]
)
def test_backward_with_gy_and_ga_together(case, seeded, force_plan):
    """The launchers with both gradients: ga adds to abar_T once per row, also when split."""
    s64, k64, cfg, per_row_k, _ = _run_case(case, force_plan)
    rows, n = s64.shape
    n_iters, mask = cfg["n_iters"], cfg["mask"]
    eps_first = max(cfg["eps_init"] or cfg["eps"], cfg["eps"])
    k_rows = k64.float() if per_row_k else None
    y, stats = cd.coor_descent_fwd(
        s64.float(), mask, k_rows, 1.0 if per_row_k else k64, n_iters, cfg["eps"], eps_first, cfg["eps_decay"]
    )
    gy, ga = torch.randn(rows, n, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    ds, dk = cd.coor_descent_bwd(gy.float(), s64.float(), mask, k_rows, stats, n_iters, ga.float())

    s_ref = s64.clone().requires_grad_()
    k_ref = k64.clone().requires_grad_() if per_row_k else k64
    a_ref, _ = coor_descent_offset_reference(s_ref, k=k_ref, **cfg)
    y_ref = coor_descent_reference(s_ref, k=k_ref, **cfg)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(cd.offset_of(stats, n_iters, s64.float(), mask), a_ref[:, 0], 1e-5, "a")
    loss = (y_ref * gy).sum() + (a_ref[:, 0] * ga).sum()
    grads_ref = torch.autograd.grad(loss, (s_ref, k_ref) if per_row_k else (s_ref,))
    assert_close(ds, grads_ref[0], 1e-4, "ds")
    if per_row_k:
        assert_close(dk, grads_ref[1], 1e-4, "dk")


def test_offset_reproduces_coor_descent_triton(seeded):
    s, mask, _ = _inputs(3, 50, density=0.7, per_row_k=False, k=None, dtype=torch.float32)
    cfg = dict(n_iters=8, k=6.5, eps=0.1, eps_init=1.0, eps_decay=0.7, mask=mask, backend="triton")
    a, e = coor_descent_offset(s.view(3, 1, 50), **{**cfg, "mask": mask.view(3, 1, 50)})
    assert a.shape == (3, 1, 1)
    y = cd.coor_descent(s, **cfg)
    assert_close(torch.exp((s + a.view(3, 1)).clamp_max(0) / e) * mask, y, 1e-5, "y from a")


def test_torch_compile_fullgraph_op_path(seeded):
    s = torch.randn(4, 33, requires_grad=True)
    mask = torch.rand(4, 33) > 0.2
    k = (torch.rand(4) * 5 + 1).requires_grad_()

    def thresholded(x, kk):
        a, e = coor_descent_offset(x.tanh() * 3, n_iters=4, k=kk, eps=0.1, mask=mask, backend="triton")
        return torch.exp((x + a).clamp_max(0) / e) * 2

    compiled = torch.compile(thresholded, fullgraph=True, backend="aot_eager")
    out = compiled(s, k)
    ds, dk = torch.autograd.grad(out.square().sum(), (s, k))
    out_eager = thresholded(s, k)
    ds_eager, dk_eager = torch.autograd.grad(out_eager.square().sum(), (s, k))
    assert_close(out, out_eager, 1e-5, "out")
    assert_close(ds, ds_eager, 1e-4, "ds")
    assert_close(dk, dk_eager, 1e-4, "dk")


def test_offset_op_opcheck(seeded):
    s = torch.randn(3, 20, requires_grad=True)
    mask = torch.rand(3, 20) > 0.3
    k = (torch.rand(3) * 5 + 1).requires_grad_()
    torch.library.opcheck(
        torch.ops.colt5.coor_descent_offset_fwd.default, (s, mask, k, 1.0, 3, 0.1, 0.5, 0.9),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_offset_bad_arguments(backend):
    s = torch.randn(2, 6)
    with pytest.raises(ValueError, match="n_iters"):
        coor_descent_offset(s, n_iters=0, k=2.0, backend=backend)
    with pytest.raises(ValueError, match="k"):
        coor_descent_offset(s, n_iters=2, k=torch.ones(3), backend=backend)
    with pytest.raises(TypeError, match="mask"):
        coor_descent_offset(s, n_iters=2, k=2.0, mask=torch.ones(2, 6), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        coor_descent_offset(s, n_iters=2, k=2.0, backend="cuda")


def test_offset_empty_input():
    a, e = coor_descent_offset(torch.randn(3, 0), n_iters=3, k=1.0, backend="triton")
    assert a.shape == (3, 1) and a.dtype == torch.float32 and (a == 0).all() and e == 0.1
