"""colt5: CoLT5-style conditional computation (routed feedforward and attention) for PyTorch."""

# The numerical core: soft top-k and the top-k built on it.
from colt5.kernels import TopkReturn, coor_descent, topk

# Routers and the routed encoder layers.
from colt5.routers import CoordinateDescentRouter, Router, RouterReturn, RouterStats, route_together
from colt5.heavy_attention import RoutedAttention
from colt5.attention import ConditionalRoutedAttention
from colt5.feedforward import ConditionalRoutedFeedForward, FeedForward
from colt5.moe import ConditionalRoutedMoEFeedForward, ExpertLoad
from colt5.block import ConditionalRoutedTransformer, ConditionalRoutedTransformerBlock

# Other routed attention: cross attention over long contexts, feature maps (the routed ViT is
# colt5.vit.ConditionalRoutedViT).
from colt5.cross_attention import ConditionalRoutedCrossAttention
from colt5.image_attention import ConditionalRoutedImageAttention

# The light attention branch; rotary embeddings at explicit positions. The op itself stays at
# colt5.local_attention.local_attention: exporting it here would shadow the module.
from colt5.local_attention import LocalMHA
from colt5.rotary import RotaryEmbedding, apply_rotary

# Strictly causal layers, the byte-level language model and its dense baseline.
from colt5.causal_routing import CausalCoordinateDescentRouter
from colt5.autoregressive import (
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedAutoregressiveFeedForward,
    ConditionalRoutedAutoregressiveTransformer,
    ConditionalRoutedAutoregressiveTransformerBlock,
)
from colt5.dense import DenseTransformer, DenseTransformerBlock
from colt5.lm import CoLT5LanguageModel

__all__ = [
    "CausalCoordinateDescentRouter",
    "CoLT5LanguageModel",
    "ConditionalRoutedAttention",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedAutoregressiveFeedForward",
    "ConditionalRoutedAutoregressiveTransformer",
    "ConditionalRoutedAutoregressiveTransformerBlock",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedImageAttention",
    "ConditionalRoutedMoEFeedForward",
    "ConditionalRoutedTransformer",
    "ConditionalRoutedTransformerBlock",
    "CoordinateDescentRouter",
    "DenseTransformer",
    "DenseTransformerBlock",
    "ExpertLoad",
    "FeedForward",
    "LocalMHA",
    "RotaryEmbedding",
    "RoutedAttention",
    "Router",
    "RouterReturn",
    "RouterStats",
    "TopkReturn",
    "apply_rotary",
    "coor_descent",
    "route_together",
    "topk",
]
