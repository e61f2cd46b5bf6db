"""transformer: a research framework for the encoder-decoder Transformer of
"Attention Is All You Need" (Vaswani et al., 2017)."""

from transformer.attention import MultiHeadAttention
from transformer.config import ModelConfig
from transformer.feed_forward import FeedForward
from transformer.layers import DecoderLayer, EncoderLayer
from transformer.model import (
    Decoder,
    DecoderCache,
    Encoder,
    Transformer,
    build_model,
    count_parameters,
    keep_attention_weights,
)
from transformer.positional import PositionalEncoding

__all__ = [
    "Decoder",
    "DecoderCache",
    "DecoderLayer",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "ModelConfig",
    "MultiHeadAttention",
    "PositionalEncoding",
    "Transformer",
    "build_model",
    "count_parameters",
    "keep_attention_weights",
]
