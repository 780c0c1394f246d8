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
