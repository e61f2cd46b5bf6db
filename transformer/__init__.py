"""transformer: a research framework for the encoder-decoder Transformer of
"Attention Is All You Need" (Vaswani et al., 2017).

``from transformer import Transformer, MultiHeadAttention, load_checkpoint, translate, ...``.
The names are imported on first use (PEP 562), so that scripts which need only the data
pipeline do not pay for importing torch's model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MultiHeadAttention": "transformer.attention",
    "FeedForward": "transformer.feed_forward",
    "PositionalEncoding": "transformer.positional",
    "RotaryPositions": "transformer.rotary",
    "ALiBiPositions": "transformer.alibi",
    "RMSNorm": "transformer.rmsnorm",
    "SwiGLU": "transformer.swiglu",
    "KVCache": "transformer.attention",
    "EncoderLayer": "transformer.layers",
    "DecoderLayer": "transformer.layers",
    "Encoder": "transformer.model",
    "Decoder": "transformer.model",
    "DecoderCache": "transformer.model",
    "Transformer": "transformer.model",
    "build_model": "transformer.model",
    "count_parameters": "transformer.model",
    "keep_attention_weights": "transformer.model",
    "ModelConfig": "transformer.config",
    "Tokenizer": "transformer.tokenizer",
    "load_checkpoint": "transformer.checkpoint",
    "translate": "transformer.translation",
    "greedy_search": "transformer.decoding",
    "beam_search": "transformer.decoding",
    "sample_search": "transformer.decoding",
    "translate_nbest": "transformer.translation",
    "Sampler": "transformer.sampling",
    "Ensemble": "transformer.ensemble",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'transformer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
