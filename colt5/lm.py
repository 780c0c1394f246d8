"""An autoregressive byte-level language model around a CoLT5 (routed) or dense backbone.

Shapes: b batch, n sequence (<= max_seq_len), d model dim, V vocabulary (256 bytes by default).

    tokens [b, n] long -> embed + learned absolute position -> backbone (ends in a LayerNorm)
    -> linear -> logits [b, n, V]

The backbone is chosen in one place, `build_backbone`: the strictly causal routed stack
(`colt5.autoregressive.ConditionalRoutedAutoregressiveTransformer`, which ends in its own final
LayerNorm) by default, or `colt5.dense.DenseTransformer(causal=True)` followed by a LayerNorm with
`dense=True`, for a like-for-like baseline. Positions are a learned absolute embedding for both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colt5 import validation
from colt5.dense import DenseTransformer
from colt5.precision import Linear

__all__ = ["CoLT5LanguageModel", "build_backbone"]


def build_backbone(dim: int, *, depth: int, dense: bool, **kwargs) -> nn.Module:
    """The one place a backbone is chosen: a causal [b, n, d] -> [b, n, d] module ending in a norm.

    kwargs go to the chosen constructor unchanged (dense: heads, dim_head, ff_mult; routed: the
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
            counts are per routing window). Dense: heads, dim_head, ff_mult.

    Example:
        model = CoLT5LanguageModel(dim=256, depth=4, max_seq_len=1024, light_window_size=64)
        loss = model.loss(batch)                    # batch [b, 1025] long bytes
        text = model.generate(prompt, length=100, top_k=32)

    forward(tokens [b, n] long) -> logits [b, n, V] (float; bf16 under autocast); empty in
    (b or n of 0), empty out.
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
    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [b, n] long, n <= max_seq_len -> logits [b, n, num_tokens]."""
        self._check_tokens(tokens, "tokens", self.max_seq_len)
        return self._logits(tokens)

    def _logits(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        x = self.token_emb(tokens) + self.pos_emb(torch.arange(n, device=tokens.device))
        return self.to_logits(self.backbone(x))

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
    ) -> Tensor:
        """Sample `length` tokens after `prompt` ([n] or [b, n] long, n >= 1).

        The context is cropped to the last max_seq_len tokens (no kv-cache: each step reruns the
        model on the window). temperature 0 means greedy; top_k keeps the k likeliest tokens.
        Returns only the new tokens, [length] or [b, length] to match the prompt's rank. Runs in
        eval mode and restores the previous mode.
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

        if prompt.shape[0] == 0:
            out = prompt.new_empty(0, length)
            return out[0] if squeeze else out
        was_training = self.training
        self.eval()
        try:
            seq = prompt
            out = prompt.new_empty(prompt.shape[0], 0)
            for _ in range(length):
                logits = self._logits(seq[:, -self.max_seq_len :])[:, -1].float()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = logits.topk(top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, -math.inf)
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                seq = torch.cat((seq, nxt), dim=1)
                out = torch.cat((out, nxt), dim=1)
        finally:
            self.train(was_training)
        return out[0] if squeeze else out
