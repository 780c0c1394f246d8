"""An autoregressive byte-level language model around a CoLT5 (routed) or dense backbone.

Shapes: b batch, n sequence (<= max_seq_len), d model dim, V vocabulary (256 bytes by default).

    tokens [b, n] long -> embed + learned absolute position -> backbone (ends in a LayerNorm)
    -> linear -> logits [b, n, V]

The backbone is chosen in one place, `build_backbone`: the strictly causal routed stack
(`colt5.autoregressive.ConditionalRoutedAutoregressiveTransformer`, which ends in its own final
LayerNorm) by default, or `colt5.dense.DenseTransformer(causal=True)` followed by a LayerNorm with
`dense=True`, for a like-for-like baseline. Positions are a learned absolute embedding for both;
`rotary_emb=True` (a backbone kwarg, which both backbones take) adds rotary embeddings in every
attention, which the training example turns on (it trains far faster: benchmarks/RESULTS.md).

Generation decodes incrementally by default (colt5/decoding.py): a prefill over the prompt fills
a cache (`new_cache`), then each new token costs one cached step whose logits equal the full
forward's on the context.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colt5 import validation
from colt5.decoding import CUDAGraphStep, without_grad_when_decoding
from colt5.dense import DenseCache, DenseTransformer
from colt5.precision import Linear

if TYPE_CHECKING:
    from colt5.autoregressive import StackCache

DecodeCache = Union["StackCache", DenseCache]

__all__ = ["CoLT5LanguageModel", "build_backbone"]


def build_backbone(dim: int, *, depth: int, dense: bool, **kwargs) -> nn.Module:
    """The one place a backbone is chosen: a causal [b, n, d] -> [b, n, d] module ending in a norm.

    kwargs go to the chosen constructor unchanged (dense: heads, dim_head, ff_mult, rotary_emb; routed: the
    block kwargs of ConditionalRoutedAutoregressiveTransformer).
    """
    if dense:
        return nn.Sequential(DenseTransformer(dim, depth=depth, causal=True, **kwargs), nn.LayerNorm(dim))
    # Imported lazily so the dense model works without the routed layers.
    from colt5.autoregressive import ConditionalRoutedAutoregressiveTransformer

    return ConditionalRoutedAutoregressiveTransformer(dim, depth=depth, **kwargs)


class CoLT5LanguageModel(nn.Module):
    """Byte-level (by default) autoregressive language model; strictly causal.

    Args (keyword-only):
        num_tokens: vocabulary size V (256 = bytes).
        dim: model width d.  depth: number of blocks.
        max_seq_len: longest input `forward` accepts (size of the position table).
        dense: False -> routed CoLT5 backbone, True -> dense transformer of the same width/depth.
        **backbone_kwargs: passed to the backbone (see `build_backbone`). Routed: the block kwargs
            of ConditionalRoutedAutoregressiveTransformer (light_heads, light_window_size,
            heavy_window_size, num_heavy_attn_tokens_q / _kv, num_heavy_ff_tokens, ...; token
            counts are per routing window). Dense: heads, dim_head, ff_mult, rotary_emb.

    Example:
        model = CoLT5LanguageModel(dim=256, depth=4, max_seq_len=1024, light_window_size=64)
        loss = model.loss(batch)                    # batch [b, 1025] long bytes
        text = model.generate(prompt, length=100, top_k=32)     # cached decoding
        cache = model.new_cache()                   # or by hand:
        logits = model(prompt, cache=cache)         # the prefill, [b, n, V]
        logits = model(next_token, cache=cache)     # next_token [b, 1] -> [b, 1, V]

    forward(tokens [b, n] long, *, cache=None) -> logits [b, n, V] (float; bf16 under autocast);
    empty in (b or n of 0), empty out.
    loss(tokens [b, n + 1] long, b >= 1, n >= 1) -> mean next-token cross entropy in nats
    (float32 scalar).
    generate(prompt, *, length, ...) -> sampled continuation (a prompt of 0 sequences gives 0).
    Tokens must be on the model's device (ValueError naming the argument otherwise).
    """

    def __init__(
        self,
        *,
        num_tokens: int = 256,
        dim: int = 512,
        depth: int = 6,
        max_seq_len: int = 4096,
        dense: bool = False,
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        self.num_tokens = validation.positive_int("num_tokens", num_tokens)
        self.dim = validation.positive_int("dim", dim)
        self.depth = validation.positive_int("depth", depth)
        self.max_seq_len = validation.positive_int("max_seq_len", max_seq_len)
        self.dense = bool(dense)
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.backbone = build_backbone(dim, depth=depth, dense=self.dense, **backbone_kwargs)
        self.to_logits = Linear(dim, num_tokens, bias=False)
        # Small embeddings keep the residual stream at unit-ish scale at init (N(0, 1) rows would
        # dominate the first blocks' updates).
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    # ---- validation -------------------------------------------------------------------------
    def _check_tokens(
        self, tokens: object, name: str, max_len: int | None, *, min_len: int = 0, min_batch: int = 0, why: str = ""
    ) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype != torch.long:
            raise TypeError(f"{name} must have dtype torch.long, got {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"{name} must have shape [batch, seq], got {tuple(tokens.shape)}")
        if tokens.shape[1] < min_len:
            raise ValueError(f"{name} must have at least {min_len} positions{why}, got shape {tuple(tokens.shape)}")
        if tokens.shape[0] < min_batch:
            raise ValueError(f"{name} must hold at least {min_batch} sequence{why}, got shape {tuple(tokens.shape)}")
        if max_len is not None and tokens.shape[1] > max_len:
            raise ValueError(f"{name} has length {tokens.shape[1]} > {max_len} (max_seq_len={self.max_seq_len})")
        validation.matches_module(tokens, self, name, dtype=False)
        # The range check reads values back to the host, so it only runs on CPU tensors (free
        # there); on accelerators it would be a sync per call. Data from colt5.data is in range.
        if tokens.device.type == "cpu" and tokens.numel() and not torch.compiler.is_compiling():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.num_tokens:
                raise ValueError(f"{name} values must lie in [0, {self.num_tokens}), got min {lo}, max {hi}")
        return tokens

    # ---- model ------------------------------------------------------------------------------
    @without_grad_when_decoding
    def forward(self, tokens: Tensor, *, cache: DecodeCache | None = None) -> Tensor:
        """tokens [b, n] long, n <= max_seq_len -> logits [b, n, num_tokens].

        cache (from `new_cache`): empty, tokens is a prompt (the prefill: the same logits as
        without a cache); after that tokens [b, 1] is the next token, at position cache.length,
        and its logits [b, 1, num_tokens] are the full forward's on the whole context, computed
        from the cache in O(cache). Advances the cache. With a cache no gradients are tracked.
        """
        if cache is None:
            self._check_tokens(tokens, "tokens", self.max_seq_len)
            return self._logits(tokens)
        from colt5.autoregressive import StackCache  # lazily, as build_backbone

        if not isinstance(cache, (StackCache, DenseCache)):
            raise TypeError(f"cache must come from CoLT5LanguageModel.new_cache, got {type(cache).__name__}")
        self._check_tokens(tokens, "tokens", None)
        cache.position.check(tokens, "tokens")
        return self._logits(tokens, cache)

    def new_cache(self, capacity: int | None = None) -> DecodeCache:
        """An empty decode cache for contexts of up to `capacity` tokens (default and at most
        max_seq_len, the end of the position table); buffers are allocated by the prefill."""
        capacity = self.max_seq_len if capacity is None else validation.positive_int("capacity", capacity)
        if capacity > self.max_seq_len:
            raise ValueError(f"capacity must be <= max_seq_len={self.max_seq_len}, got {capacity}")
        return self._stack().new_cache(capacity)

    def _stack(self) -> nn.Module:
        """The backbone's part that takes a cache (the dense one's LayerNorm comes after it)."""
        return self.backbone[0] if self.dense else self.backbone

    def _logits(self, tokens: Tensor, cache: DecodeCache | None = None) -> Tensor:
        n = tokens.shape[1]
        positions = torch.arange(n, device=tokens.device)
        if cache is not None and cache.length:
            positions = positions + cache.position.tensor  # a device tensor: graph-capturable
        x = self.token_emb(tokens) + self.pos_emb(positions)
        if cache is None:
            return self.to_logits(self.backbone(x))
        x = self._stack()(x, cache=cache)
        return self.to_logits(self.backbone[1](x) if self.dense else x)

    def loss(self, tokens: Tensor) -> Tensor:
        """tokens [b, n + 1] long -> mean cross entropy (nats) of predicting tokens[:, 1:].

        Divide by ln 2 for bits per byte.
        """
        self._check_tokens(tokens, "tokens", self.max_seq_len + 1, min_len=2, min_batch=1, why=" for a next-token loss")
        logits = self._logits(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        *,
        length: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache: bool = True,
        overflow: str = "slide",
        cuda_graph: bool | None = None,
    ) -> Tensor:
        """Sample `length` tokens after `prompt` ([n] or [b, n] long, n >= 1).

        temperature 0 means greedy; top_k keeps the k likeliest tokens. Returns only the new
        tokens, [length] or [b, length] to match the prompt's rank. Runs in eval mode and
        restores the previous mode.

        cache=True (the default) decodes incrementally (colt5/decoding.py): a prefill over the
        prompt's last max_seq_len tokens, then one step per token from a cache, whose logits
        equal the full forward's on the context. The learned positions end at max_seq_len, so a
        context cannot grow past it; `overflow` says what happens then:
          "slide" (default): every later step runs the model on the last max_seq_len tokens, as
            cache=False does (positions are absolute: once the window slides, nothing of the
            previous context's state carries over). The same tokens as cache=False, always.
          "restart": the last max_seq_len // 2 tokens are prefilled as a new context (at
            positions 0..) and decoding goes on from the cache, so contexts grow from
            max_seq_len // 2 to max_seq_len tokens: one prefill per max_seq_len // 2 new tokens.
        cache=False re-runs the model on the last max_seq_len tokens at every step.
        cuda_graph (default: True on CUDA with the cache) replays each step from a CUDA graph, one
        per kind of step (`colt5.decoding.step_key`), captured the first time it comes up.
        """
        if not isinstance(prompt, Tensor):
            raise TypeError(f"prompt must be a torch.Tensor, got {type(prompt).__name__}")
        squeeze = prompt.ndim == 1
        prompt = prompt[None] if squeeze else prompt
        # The prompt may be longer than the context window; only its tail is used.
        self._check_tokens(prompt, "prompt", None, min_len=1, why=" to continue")
        validation.int_at_least("length", length, 0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.num_tokens):
            raise ValueError(f"top_k must be None or an int in [1, {self.num_tokens}], got {top_k!r}")
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be a bool, got {type(cache).__name__}")
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be None or a bool, got {type(cuda_graph).__name__}")
        if overflow not in ("slide", "restart"):
            raise ValueError(f"overflow must be 'slide' or 'restart', got {overflow!r}")
        if cuda_graph and not (cache and prompt.is_cuda):
            raise ValueError(f"cuda_graph=True needs cache=True and a CUDA model, got cache={cache} on {prompt.device}")
        if cuda_graph is None:  # measured ~10x more bytes/s on an H200 (benchmarks/RESULTS.md)
            cuda_graph = cache and prompt.is_cuda

        if prompt.shape[0] == 0:
            out = prompt.new_empty(0, length)
            return out[0] if squeeze else out

        def sample(logits: Tensor) -> Tensor:  # [b, V] -> [b, 1]
            logits = logits.float()
            if temperature == 0:
                return logits.argmax(-1, keepdim=True)
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            return torch.multinomial(logits.softmax(-1), 1, generator=generator)

        was_training = self.training
        self.eval()
        try:
            if cache:
                out = self._generate_cached(prompt, length, sample, overflow, cuda_graph)
            else:
                seq = prompt
                out = prompt.new_empty(prompt.shape[0], 0)
                for _ in range(length):
                    nxt = sample(self._logits(seq[:, -self.max_seq_len :])[:, -1])
                    seq = torch.cat((seq, nxt), dim=1)
                    out = torch.cat((out, nxt), dim=1)
        finally:
            self.train(was_training)
        return out[0] if squeeze else out

    def _generate_cached(self, prompt: Tensor, length: int, sample, overflow: str, cuda_graph: bool) -> Tensor:
        L = self.max_seq_len
        out = prompt.new_empty(prompt.shape[0], length)
        if length == 0:
            return out
        cache = self.new_cache(min(L, min(prompt.shape[1], L) + length - 1))  # the room this call can use
        logits = self._logits(prompt[:, -L:], cache)[:, -1]
        step = None
        if cuda_graph:
            step = CUDAGraphStep(lambda t: self._logits(t, cache)[:, -1], cache.position, prompt[:, :1])
        for i in range(length):
            nxt = sample(logits)  # [b, 1]
            out[:, i : i + 1] = nxt
            if i + 1 == length:
                break
            if cache.length < cache.position.capacity:
                logits = self._logits(nxt, cache)[:, -1] if step is None else step(nxt, cache.step_key())
                continue
            # The context is full (max_seq_len positions).
            context = torch.cat((prompt[:, -L:], out[:, : i + 1]), dim=1)
            if overflow == "slide":  # the last L tokens, as re-running does (the cache stays full)
                logits = self._logits(context[:, -L:])[:, -1]
            else:  # a new context of the last L // 2 tokens
                cache.reset()
                logits = self._logits(context[:, -max(1, L // 2) :], cache)[:, -1]
        return out
