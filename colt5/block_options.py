"""The routed blocks' options, defined once: which go to the attention, which to the feedforward.

A block (`ConditionalRoutedTransformerBlock`, `ConditionalRoutedAutoregressiveTransformerBlock`,
the ViT's layers) takes the options of both its sublayers under one namespace; the tables below
say where each goes and under which name the sublayer takes it. The blocks keep their explicit
keyword signatures (what users and their editors see) and hand their arguments to
`split_block_options`, so adding an option to a sublayer means adding it to its block's
signature and to one table here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ATTENTION_OPTIONS", "FEEDFORWARD_OPTIONS", "SHARED_OPTIONS", "block_options", "split_block_options"]

# block option -> the attention's argument
ATTENTION_OPTIONS: dict[str, str] = {
    "num_heavy_attn_tokens_q": "num_heavy_tokens_q",
    "num_heavy_attn_tokens_kv": "num_heavy_tokens_kv",
    **{
        name: name
        for name in (
            "num_routed_kv",
            "has_light_attn",  # encoder block
            "light_dim_head",
            "light_heads",
            "light_window_size",
            "heavy_window_size",  # causal block (its routing window, shared with the feedforward)
            "heavy_dim_head",
            "heavy_heads",
            "multiply_keys_by_score",
            "multiply_queries_by_score",
            "use_null_q_tokens",
            "use_flash_attn",
            "rotary_emb",
        )
    },
}

# block option -> the feedforward's argument
FEEDFORWARD_OPTIONS: dict[str, str] = {
    "num_heavy_ff_tokens": "num_heavy_tokens",
    "light_ff_mult": "light_ff_mult",
    "heavy_ff_mult": "heavy_ff_mult",
    "heavy_window_size": "heavy_window_size",  # causal block
}

# options both sublayers take under the same name (their routers' settings)
SHARED_OPTIONS: tuple[str, ...] = ("router_straight_through", "router_kwargs", "use_triton", "router_class")

_ALL = frozenset(ATTENTION_OPTIONS) | frozenset(FEEDFORWARD_OPTIONS) | frozenset(SHARED_OPTIONS)


def block_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The block options among a constructor's arguments (e.g. its `locals()`)."""
    return {name: value for name, value in arguments.items() if name in _ALL}


def split_block_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Block options -> (the attention's keyword arguments, the feedforward's), each under the
    sublayer's name for it. Options a block does not have are simply absent.

    Raises TypeError for a name that is no block option.
    """
    unknown = sorted(set(options) - _ALL)
    if unknown:
        raise TypeError(f"unexpected block option(s) {', '.join(map(repr, unknown))}")
    attention = {ATTENTION_OPTIONS[name]: value for name, value in options.items() if name in ATTENTION_OPTIONS}
    feedforward = {FEEDFORWARD_OPTIONS[name]: value for name, value in options.items() if name in FEEDFORWARD_OPTIONS}
    for name in SHARED_OPTIONS:
        if name in options:
            attention[name] = feedforward[name] = options[name]
    return attention, feedforward
