"""Hard top-k positions: the Triton radix select (interpreter on CPU) against the sort-based
reference, with ties, masks, non-finite scores, streamed rows and bad input."""

import importlib

import pytest
import torch

from colt5.kernels import top_k_indices
from conftest import requires_cuda

sel = importlib.import_module("colt5.kernels.select")


pytestmark = pytest.mark.usefixtures("poisoned")


def _scores(rows, n, dtype, *, ties, specials):
    s = torch.randn(rows, n, dtype=torch.float64).to(dtype)
    if ties:  # a block of equal scores straddling the cut, and rounding to few values
        s[:, : n // 2] = s[:, : n // 2].mul(2).round().div(2)
    if specials and n >= 6:
        s[0, :6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, float("nan")], dtype=dtype)
    return s


CASES = {
    # rows, n, k, mask density, dtype, ties, non-finite scores, forced chunk (streaming)
    "rows2-n1-k1": (2, 1, 1, 1.0, torch.float32, False, False, None),
    "rows3-n63-k5-masked-ties": (3, 63, 5, 0.5, torch.float32, True, False, None),
    "rows4-n257-k257-masked": (4, 257, 257, 0.7, torch.float32, False, True, None),
    "rows3-n1000-k100-specials": (3, 1000, 100, 1.0, torch.float32, True, True, None),
    "rows2-n300-k200-sparse-mask": (2, 300, 200, 0.2, torch.float32, False, False, None),
    "rows3-n257-k31-bf16-ties": (3, 257, 31, 1.0, torch.bfloat16, True, True, None),
    "rows2-n200-k17-fp16-masked": (2, 200, 17, 0.6, torch.float16, False, True, None),
    "rows3-n1000-k100-streamed": (3, 1000, 100, 0.8, torch.float32, True, True, 128),
    "rows2-n257-k1-streamed-chunk64": (2, 257, 1, 1.0, torch.float32, False, True, 64),
    "rows1-n5000-k700-streamed-ties": (1, 5000, 700, 1.0, torch.float32, True, False, 1024),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_reference(case):
    rows, n, k, density, dtype, ties, specials, block = CASES[case]
    s = _scores(rows, n, dtype, ties=ties, specials=specials)
    mask = torch.rand(rows, n) < density if density < 1 else None
    if block is None:
        got = top_k_indices(s, k, mask=mask, backend="triton")
    else:  # the launcher itself: the public function picks the chunk
        got = sel.top_k_indices_triton(s, mask, k, block_n=block)
    want = top_k_indices(s, k, mask=mask, backend="reference")
    assert got.dtype == torch.int64 and got.shape == (rows, k)
    assert torch.equal(got, want), f"first rows differ: {got[0, :8].tolist()} vs {want[0, :8].tolist()}"


def test_reference_is_topk_by_score_then_position():
    s = torch.randn(4, 50, dtype=torch.float64)
    got = top_k_indices(s, 7, backend="reference")
    assert torch.equal(got, s.topk(7, dim=-1).indices.sort(-1).values)  # distinct scores: torch.topk's set
    ties = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
    assert top_k_indices(ties, 3, backend="reference").tolist() == [[1, 2, 3]]  # ties by lower position
    bad = torch.tensor([[float("nan"), 1.0, -5.0, 3.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert top_k_indices(bad, 2, mask=mask, backend="reference").tolist() == [[1, 2]]  # NaN, masked lowest
    assert top_k_indices(bad, 4, mask=mask, backend="reference").tolist() == [[0, 1, 2, 3]]


def test_leading_dims_and_default_backend_on_cpu():
    s = torch.randn(2, 3, 40)
    got = top_k_indices(s, 6)  # CPU tensor -> reference
    assert got.shape == (2, 3, 6)
    assert torch.equal(got, top_k_indices(s, 6, backend="triton"))


def test_compiled_fullgraph_runs_the_op():
    s = torch.randn(3, 100)

    @torch.compile(fullgraph=True, backend="eager")
    def pick(x):
        return top_k_indices(x, 9, backend="triton")

    assert torch.equal(pick(s), top_k_indices(s, 9, backend="reference"))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(s=torch.randn(2, 5).long(), k=1), TypeError, "floating"),
        (dict(s=torch.randn(2, 5), k=0), ValueError, "k must be an int in"),
        (dict(s=torch.randn(2, 5), k=6), ValueError, "k must be an int in"),
        (dict(s=torch.randn(2, 5), k=2.0), ValueError, "k must be an int in"),
        (dict(s=torch.randn(2, 5), k=2, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have the shape"),
        (dict(s=torch.randn(2, 5), k=2, mask=torch.ones(2, 5)), TypeError, "mask must have dtype"),
        (dict(s=torch.randn(2, 5), k=2, backend="cuda"), ValueError, "backend must be"),
    ],
)
def test_bad_input(kwargs, error, match):
    s, k = kwargs.pop("s"), kwargs.pop("k")
    with pytest.raises(error, match=match):
        top_k_indices(s, k, **kwargs)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "rows,n,k",
    [(3, 8192, 512), (2, 32768, 2048), (1, 131072, 8192), (64, 1000, 100), (2, 50000, 3), (4, 4096, 4096)],
    ids=["rows3-n8192", "rows2-n32768", "rows1-n131072-streamed", "rows64-n1000", "rows2-n50000-k3", "rows4-k-is-n"],
)
def test_cuda_matches_reference(rows, n, k):
    s = torch.randn(rows, n, device="cuda")
    s[:, : n // 4] = s[:, : n // 4].round()  # many ties
    mask = torch.rand(rows, n, device="cuda") < 0.9
    for m in (None, mask):
        got = top_k_indices(s, k, mask=m)
        assert torch.equal(got, top_k_indices(s, k, mask=m, backend="reference"))
