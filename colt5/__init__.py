"""colt5: CoLT5-style conditional computation (routed feedforward and attention) for PyTorch."""

from colt5.kernels import TopkReturn, coor_descent, topk

__all__ = ["coor_descent", "topk", "TopkReturn"]

# Routed encoder layers (issue 3).
from colt5.attention import ConditionalRoutedAttention, heavy_attend  # noqa: E402
from colt5.block import ConditionalRoutedTransformer, ConditionalRoutedTransformerBlock  # noqa: E402
from colt5.feedforward import ConditionalRoutedFeedForward, FeedForward  # noqa: E402
from colt5.moe import ConditionalRoutedMoEFeedForward, ExpertLoad  # noqa: E402

__all__ += [
    "ConditionalRoutedAttention",
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedMoEFeedForward",
    "ConditionalRoutedTransformer",
    "ConditionalRoutedTransformerBlock",
    "ExpertLoad",
    "FeedForward",
    "heavy_attend",
]

# Non-causal routed attention variants (issue 4): cross attention over long contexts, feature maps.
# The routed ViT lives in its own module: colt5.vit.ConditionalRoutedViT.
from colt5.cross_attention import ConditionalRoutedCrossAttention  # noqa: E402
from colt5.image_attention import ConditionalRoutedImageAttention  # noqa: E402

__all__ += ["ConditionalRoutedCrossAttention", "ConditionalRoutedImageAttention"]

# Light attention branch: local windowed attention, rotary embeddings at explicit positions.
# The op stays at colt5.local_attention.local_attention: exporting it here would shadow the module.
from colt5.local_attention import LocalMHA  # noqa: E402
from colt5.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

__all__ += ["LocalMHA", "RotaryEmbedding", "apply_rotary"]

# Byte-level language model, dense baseline, corpora (issue 5).
from colt5.dense import DenseTransformer, DenseTransformerBlock  # noqa: E402
from colt5.lm import CoLT5LanguageModel  # noqa: E402

__all__ += ["CoLT5LanguageModel", "DenseTransformer", "DenseTransformerBlock"]

# Strictly causal routed layers for language models (issue 4).
from colt5.autoregressive import (  # noqa: E402
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedAutoregressiveFeedForward,
    ConditionalRoutedAutoregressiveTransformer,
    ConditionalRoutedAutoregressiveTransformerBlock,
)
from colt5.causal_routing import CausalCoordinateDescentRouter  # noqa: E402

__all__ += [
    "CausalCoordinateDescentRouter",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedAutoregressiveFeedForward",
    "ConditionalRoutedAutoregressiveTransformer",
    "ConditionalRoutedAutoregressiveTransformerBlock",
]
