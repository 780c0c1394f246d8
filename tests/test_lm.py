"""CoLT5LanguageModel: shapes, loss, sampling, strict causality (dense and routed backbones), errors."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from colt5.lm import CoLT5LanguageModel

HAS_ROUTED = importlib.util.find_spec("colt5.autoregressive") is not None


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread

# Small routed configuration for tests; every size is far below the sequence lengths used.
ROUTED_TEST_KWARGS = dict(
    num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=8, num_heavy_ff_tokens=4, light_dim_head=8, light_heads=2,
    light_window_size=4, heavy_window_size=8, heavy_dim_head=8, heavy_heads=2, light_ff_mult=0.5, heavy_ff_mult=2,
)


def make_model(backbone: str, *, max_seq_len: int = 32, dim: int = 16, depth: int = 2, num_tokens: int = 256):
    if backbone == "dense":
        return CoLT5LanguageModel(num_tokens=num_tokens, dim=dim, depth=depth, max_seq_len=max_seq_len, dense=True, heads=2, dim_head=8)
    if not HAS_ROUTED:
        pytest.skip("colt5.autoregressive (routed causal stack) not available yet")
    return CoLT5LanguageModel(num_tokens=num_tokens, dim=dim, depth=depth, max_seq_len=max_seq_len, **ROUTED_TEST_KWARGS)


BACKBONES = ["dense", "routed"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_and_loss(backbone):
    torch.manual_seed(0)
    model = make_model(backbone)
    tokens = torch.randint(0, 256, (3, 33))
    logits = model(tokens[:, :-1])
    assert logits.shape == (3, 32, 256) and logits.dtype == torch.float32
    expected = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
    loss = model.loss(tokens)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    # At init the model is close to uniform over bytes: about 8 bits per byte.
    assert abs(loss.item() / math.log(2) - 8) < 1.0
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    # Shorter inputs work too.
    assert model(tokens[:, :5]).shape == (3, 5, 256)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_strictly_causal(backbone):
    """Replacing bytes from position j on leaves every logit before j unchanged (float64, many j)."""
    torch.manual_seed(1)
    n = 32
    model = make_model(backbone, max_seq_len=n).double().eval()
    tokens = torch.randint(0, 256, (2, n))
    with torch.no_grad():
        base = model(tokens)
        for j in range(0, n, 3):
            changed = tokens.clone()
            changed[:, j:] = torch.randint(0, 256, (2, n - j))
            out = model(changed)
            diff = (out[:, :j] - base[:, :j]).abs().max().item() if j else 0.0
            assert diff <= 1e-9, f"logits before position {j} changed by {diff:.3e}"
            if j < n - 1:
                # The test could fail: later logits do depend on the replaced bytes.
                assert not torch.allclose(out[:, j + 1 :], base[:, j + 1 :])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_generate(backbone):
    torch.manual_seed(2)
    model = make_model(backbone, max_seq_len=16).train()
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, length=20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 20) and out.dtype == torch.long and 0 <= out.min() and out.max() < 256
    assert model.training, "generate must restore training mode"
    # Reproducible with the same generator; one-dimensional prompts give one-dimensional output.
    again = model.generate(prompt, length=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert model.generate(prompt[0], length=3).shape == (3,)
    assert model.generate(prompt, length=0).shape == (2, 0)

    # Greedy decoding equals top_k=1 and equals argmax of a full forward on the cropped context,
    # also once the sequence is longer than max_seq_len (context cropping).
    long_prompt = torch.randint(0, 256, (1, 30))
    greedy = model.generate(long_prompt, length=4, temperature=0)
    assert torch.equal(greedy, model.generate(long_prompt, length=4, top_k=1))
    seq = long_prompt
    model.eval()
    with torch.no_grad():
        for i in range(4):
            nxt = model(seq[:, -16:])[:, -1].argmax(-1)
            assert torch.equal(nxt, greedy[:, i])
            seq = torch.cat((seq, nxt[:, None]), dim=1)


def test_top_k_restricts_support():
    torch.manual_seed(3)
    model = make_model("dense", max_seq_len=8, num_tokens=16).eval()
    prompt = torch.randint(0, 16, (64, 3))
    with torch.no_grad():
        allowed = model(prompt)[:, -1].topk(3, dim=-1).indices
    first = model.generate(prompt, length=1, top_k=3, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert (first == allowed).any(-1).all()


def test_bad_inputs():
    model = make_model("dense", max_seq_len=8)
    with pytest.raises(TypeError, match="dtype torch.long"):
        model(torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2]])
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="values must lie in"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="values must lie in"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model.loss(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        model.loss(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 1 sequence"):
        model.loss(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt must have at least 1 position"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), length=2)
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="length"):
        model.generate(prompt, length=-1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, length=1, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, length=1, top_k=0)
    with pytest.raises(ValueError, match="dim"):
        CoLT5LanguageModel(dim=0, dense=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        CoLT5LanguageModel(max_seq_len=-3, dense=True)
