"""Shared fixtures and helpers.

By default Triton kernels run under Triton's interpreter (CPU tensors), on any machine, so the
suite is the same with or without a GPU. `COLT5_GPU_TESTS=1` on a CUDA machine compiles the
kernels instead and enables the tests marked `gpu`/`requires_cuda` (CUDA parity, flex
attention, the 1M row): `COLT5_GPU_TESTS=1 python -m pytest -q -m gpu`.
"""

import os

import torch

GPU_MODE = os.environ.get("COLT5_GPU_TESTS") == "1" and torch.cuda.is_available()
if not GPU_MODE:
    # Must be set before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

HAS_CUDA = GPU_MODE

# Tolerances per compute dtype: (relative error of outputs, relative error of gradients).
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 5e-2),
    torch.float16: (5e-3, 2e-2),
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, tiny), in float64; NaN never passes."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    denom = expected.norm().clamp_min(1e-30)
    return ((actual - expected).norm() / denom).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_error(actual, expected)
    max_abs = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item() if actual.numel() else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e} (max abs {max_abs:.3e})"


@pytest.fixture(autouse=True)
def seeded(request):
    """Fresh random inputs per test, but reproducible: the seed is derived from the test id."""
    torch.manual_seed(sum(map(ord, request.node.nodeid)) % 2**31)
    yield


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy machine's OpenMP stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def local_allowed(n: int, w: int, lb: int, lf: int, causal: bool, exact: bool) -> torch.Tensor:
    """Local attention's rule straight from its definition, bool [n (queries), n (keys)]: the key's
    window within [-lb, lf] of the query's, causal and exact-window limits on top."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    diff = j // w - i // w
    ok = (diff >= -lb) & (diff <= lf)
    if causal:
        ok &= j <= i
    if exact:
        ok &= i - j <= w * lb
        if not causal:
            ok &= j - i <= w * lf
    return ok


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and COLT5_GPU_TESTS=1")


def literal_coor_descent(s, *, n_iters, k, eps, eps_init, eps_decay, mask):
    """The design note's iteration as written (b = -relu(s + a)), for float64 checks of both
    implementations: returns (a_T [..., 1], y). Finite s and no fully masked rows only."""
    from colt5.kernels.checks import eps_schedule

    log_k = k.log().unsqueeze(-1) if torch.is_tensor(k) else math.log(k)
    schedule = eps_schedule(n_iters, eps, eps_init, eps_decay)
    a, b = torch.zeros_like(s[..., :1]), -s
    for e in schedule[:-1]:
        z = ((s + b) / e).masked_fill(~mask, float("-inf"))
        a = e * (log_k - z.logsumexp(-1, keepdim=True))
        b = -torch.relu(s + a)
    return a, torch.exp((s + a + b) / schedule[-1]) * mask


def _poisoned_empty(shape, *, dtype, device):
    """`runtime.empty` while poisoned: NaN, True for bools, an integer type's lowest value (never
    an index or a slot), so an element no kernel writes shows in the result."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return out.fill_(float("nan"))
    return out.fill_(True if dtype == torch.bool else torch.iinfo(dtype).min)


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output and workspace starts poisoned: a kernel that leaves an element unwritten
    fails the test."""
    from colt5.kernels import runtime

    monkeypatch.setattr(runtime, "empty", _poisoned_empty)


@pytest.fixture
def force_plan(monkeypatch):
    """`force_plan(**overrides)`: the soft top-k's launches take `make_plan(..., **overrides)`
    (small chunks, splits, the multi-launch path on tiny rows) until the test ends."""
    import importlib

    cd = importlib.import_module("colt5.kernels.soft_topk")

    def force(**overrides):
        monkeypatch.setattr(cd, "plan_for", lambda rows, n, device: cd.make_plan(rows, n, device, **overrides))

    return force


@pytest.fixture
def force_blocks(monkeypatch):
    """`force_blocks(bm, bn)`: the flash-attention kernels run on bm x bn tiles, forward and
    backward (stages and warps as chosen), until the test ends."""
    import importlib

    A = importlib.import_module("colt5.kernels.flash_attention")
    chosen = A._configs

    def force(bm: int, bn: int) -> None:
        def configs(dtype, dh):
            return tuple(t._replace(block_m=bm, block_n=bn) for t in chosen(dtype, dh))

        monkeypatch.setattr(A, "_configs", configs)

    return force
