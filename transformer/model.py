"""The encoder-decoder Transformer, paper section 3 and figure 1.

``Transformer.forward(src_tokens (B, S), tgt_tokens (B, T)) -> logits (B, T, V_tgt)``.

The seed's loop maps onto three calls: ``encode`` runs the encoder ONCE over the source
(step 1); ``decode`` predicts the next tokens from the encoder output and the tokens so
far (steps 2-3), and beam search repeats it (step 4). With a ``DecoderCache`` from
``new_cache()``, each ``decode`` call is given only the newest token(s) and reuses the
keys/values of earlier positions, so a step costs only the new work.

The parts (attention, positions, norm, feed-forward) come in as factories, called with
the sizes: ``build_model`` makes them from the config groups ``model/attention``,
``model/positional``, ``model/norm`` and ``model/ffn`` (``transformer/components.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from transformer.attention import MultiHeadAttention, check_dropout
from transformer.components import PARTS, factory
from transformer.config import ModelConfig
from transformer.dropout import TokenDropout
from transformer.feed_forward import FeedForward
from transformer.layers import DecoderLayer, EncoderLayer, LayerCache
from transformer.positional import PositionalEncoding

SHARE_EMBEDDINGS = ("none", "decoder", "all")


class Embedding(nn.Module):
    """Token embeddings scaled by sqrt(d_model) (section 3.4; ``scale=False`` leaves them
    unscaled, as some imported models expect), then positions (3.5). ``token_dropout``
    drops whole token vectors in training, before the positions are added."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int, positions: nn.Module,
                 scale: bool = True, token_dropout: float = 0.0):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.token_dropout = TokenDropout(token_dropout)
        self.positions = positions
        self.scale = math.sqrt(d_model) if scale else 1.0

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        x = self.token_dropout(self.tokens(tokens) * self.scale)
        return self.positions(x, offset)  # (B, T, d)


def run_layer(layer: nn.Module, recompute: bool, *args) -> Tensor:
    """``layer(*args)``; with ``recompute`` (activation checkpointing), and only when a
    backward will follow (training, gradients on), the layer's inner activations are not
    kept for the backward but recomputed there from its input: memory for one more forward
    of the layer. ``use_reentrant=False`` keeps the RNG state, so the recomputation draws
    the same dropout masks and the gradients are those of the plain forward."""
    if recompute and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class Encoder(nn.Module):
    def __init__(self, embedding: Embedding, layers: list[EncoderLayer], final_norm: nn.Module):
        super().__init__()
        self.embedding, self.layers, self.final_norm = embedding, nn.ModuleList(layers), final_norm
        self.recompute_layers = False  # activation checkpointing (set_activation_checkpointing)

    def forward(self, src_tokens: Tensor, src_mask: Tensor) -> Tensor:
        """src_tokens (B, S), src_mask (B, 1, 1, S) True at real tokens -> (B, S, d)."""
        x = self.embedding(src_tokens)
        for layer in self.layers:
            x = run_layer(layer, self.recompute_layers, x, src_mask)
        return self.final_norm(x)


class DecoderCache:
    """Keys/values saved across incremental ``decode`` calls, one ``LayerCache`` a layer."""

    def __init__(self, n_layers: int):
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.length = 0  # target positions already decoded

    def reorder(self, index: Tensor, cross_attention: bool = True) -> None:
        """Keep rows ``index`` (B_new,) of the batch, e.g. the surviving beams: of every
        tensor an attention module keeps in its cache. ``cross_attention=False`` leaves the
        encoder keys/values alone: right when rows move only among the beams of one
        sentence, which share them."""
        for layer in self.layers:
            for cache in (layer.self_attn, layer.cross_attn) if cross_attention \
                    else (layer.self_attn,):
                for name, value in vars(cache).items():
                    if isinstance(value, Tensor):
                        setattr(cache, name, value.index_select(0, index))


class Decoder(nn.Module):
    def __init__(self, embedding: Embedding, layers: list[DecoderLayer], final_norm: nn.Module):
        super().__init__()
        self.embedding, self.layers, self.final_norm = embedding, nn.ModuleList(layers), final_norm
        self.recompute_layers = False  # activation checkpointing (set_activation_checkpointing)

    def forward(self, tgt_tokens: Tensor, memory: Tensor, memory_mask: Tensor,
                cache: DecoderCache | None = None) -> Tensor:
        """tgt_tokens (B, T) (only the new ones with a cache) -> states (B, T, d)."""
        offset = cache.length if cache is not None else 0
        x = self.embedding(tgt_tokens, offset)
        for i, layer in enumerate(self.layers):
            if cache is not None:  # incremental decoding: no backward, and the cache grows
                x = layer(x, memory, memory_mask, cache.layers[i])
            else:
                x = run_layer(layer, self.recompute_layers, x, memory, memory_mask)
        if cache is not None:
            cache.length += tgt_tokens.size(1)
        return self.final_norm(x)


class Transformer(nn.Module):
    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_encoder_layers: int = 6,
        n_decoder_layers: int = 6,
        d_ff: int = 2048,
        dropout: float = 0.1,
        norm_first: bool = False,
        share_embeddings: str = "none",
        pad_id: int = 0,
        max_len: int = 1024,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        scale_embedding: bool = True,
        output_bias: bool = False,
        token_dropout: float = 0.0,
        attention: Callable[..., nn.Module] = MultiHeadAttention,
        positional: Callable[..., nn.Module] = PositionalEncoding,
        norm: Callable[[int], nn.Module] = nn.LayerNorm,
        feed_forward: Callable[..., nn.Module] = FeedForward,
    ):
        """``attention``, ``positional``, ``norm`` and ``feed_forward`` build a part from
        the sizes (``transformer/components.py`` lists the calls); the defaults are the
        paper's."""
        super().__init__()
        check_arguments(src_vocab_size, tgt_vocab_size, d_model, n_heads, dropout,
                        share_embeddings)
        check_dropout("token_dropout", token_dropout)
        self.pad_id, self.d_model = pad_id, d_model

        def self_attention(positions: nn.Module) -> nn.Module:
            if getattr(positions, "in_attention", False):  # RoPE, ALiBi: positions act here
                return attention(d_model, n_heads, attention_dropout, positions=positions)
            return attention(d_model, n_heads, attention_dropout)

        def cross_attention() -> nn.Module:  # no positions across the two sequences
            return attention(d_model, n_heads, attention_dropout)

        def ffn() -> nn.Module:
            return feed_forward(d_model, d_ff, activation_dropout)

        def final_norm() -> nn.Module:  # pre-norm stacks end with a norm
            return norm(d_model) if norm_first else nn.Identity()

        def embedding(vocab_size: int) -> Embedding:
            positions = positional(d_model, max_len, dropout)
            return Embedding(vocab_size, d_model, pad_id, positions, scale_embedding,
                             token_dropout)

        src_embedding, tgt_embedding = embedding(src_vocab_size), embedding(tgt_vocab_size)
        if share_embeddings == "all":
            tgt_embedding.tokens = src_embedding.tokens
        src_positions, tgt_positions = src_embedding.positions, tgt_embedding.positions
        self.encoder = Encoder(src_embedding, [
            EncoderLayer(d_model, self_attention(src_positions), ffn(), dropout, norm_first,
                         norm)
            for _ in range(n_encoder_layers)], final_norm())
        self.decoder = Decoder(tgt_embedding, [
            DecoderLayer(d_model, self_attention(tgt_positions), cross_attention(), ffn(),
                         dropout, norm_first, norm)
            for _ in range(n_decoder_layers)], final_norm())
        # output_bias: a bias on the logits (Marian's final_logits_bias), off in the paper.
        self.output_projection = nn.Linear(d_model, tgt_vocab_size, bias=output_bias)
        self.reset_parameters()
        if share_embeddings in ("decoder", "all"):  # section 3.4: tie pre-softmax to embedding
            self.output_projection.weight = tgt_embedding.tokens.weight

    def reset_parameters(self) -> None:
        """Xavier-uniform projections, N(0, d^-1/2) embeddings with a zero padding row."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.d_model**-0.5)
                nn.init.zeros_(module.weight[module.padding_idx])
        nn.init.normal_(self.output_projection.weight, mean=0.0, std=self.d_model**-0.5)

    @property
    def max_len(self) -> int:
        """Target positions the decoder can embed (BOS included)."""
        return self.decoder.embedding.positions.max_len

    def forward(self, src_tokens: Tensor, tgt_tokens: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V_tgt) for source (B, S) and target input (B, T)."""
        memory, src_padding_mask = self.encode(src_tokens)
        return self.decode(tgt_tokens, memory, src_padding_mask)

    def encode(self, src_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """-> memory (B, S, d), src_padding_mask (B, S) bool, True at padding."""
        src_padding_mask = src_tokens.eq(self.pad_id)
        return self.encoder(src_tokens, attention_mask(src_padding_mask)), src_padding_mask

    def decode(self, tgt_tokens: Tensor, memory: Tensor, src_padding_mask: Tensor,
               cache: DecoderCache | None = None) -> Tensor:
        """Logits (B, T, V_tgt) of the tokens that follow each of ``tgt_tokens`` (B, T)."""
        return self.output_projection(self.decode_states(tgt_tokens, memory, src_padding_mask,
                                                         cache))

    def decode_states(self, tgt_tokens: Tensor, memory: Tensor, src_padding_mask: Tensor,
                      cache: DecoderCache | None = None) -> Tensor:
        """The decoder's output states (B, T, d), before the output projection (a loss that
        projects chunk by chunk starts here)."""
        return self.decoder(tgt_tokens, memory, attention_mask(src_padding_mask), cache)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each encoder and decoder layer's activations in the backward instead
        of keeping them (``run_layer``), in training only: ``trainer.activation_checkpointing``.
        Saves most of the activation memory for about one more forward of the layers."""
        self.encoder.recompute_layers = self.decoder.recompute_layers = enabled

    def new_cache(self) -> DecoderCache:
        """An empty cache for incremental ``decode`` (pass the newest token(s) each call)."""
        return DecoderCache(len(self.decoder.layers))


def attention_mask(padding_mask: Tensor) -> Tensor:
    """(B, S) True at padding -> (B, 1, 1, S) True where attention is allowed."""
    return ~padding_mask[:, None, None, :]


def check_arguments(src_vocab_size: int, tgt_vocab_size: int, d_model: int, n_heads: int,
                    dropout: float, share_embeddings: str) -> None:
    if d_model % n_heads != 0:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    check_dropout("dropout", dropout)
    if share_embeddings not in SHARE_EMBEDDINGS:
        raise ValueError(
            f"share_embeddings={share_embeddings!r} is not one of {list(SHARE_EMBEDDINGS)}")
    if share_embeddings == "all" and src_vocab_size != tgt_vocab_size:
        raise ValueError(
            f"share_embeddings='all' needs one vocabulary, got src_vocab_size={src_vocab_size} "
            f"and tgt_vocab_size={tgt_vocab_size}")


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int,
                trusted: Sequence[str] | None = None) -> Transformer:
    """The factory: a ``Transformer`` from the ``model`` config group. Its parts come from
    their entries (None: the paper's); ``trusted``: see ``components.factory`` (a
    checkpoint's config names classes of trusted modules only)."""
    parts = {name: factory(getattr(cfg, name), f"model.{name}", trusted)
             for name in PARTS if getattr(cfg, name) is not None}
    if "ffn" in parts:  # the config group's short name; Transformer's argument's long one
        parts["feed_forward"] = parts.pop("ffn")
    n_encoder_layers = cfg.n_layers if cfg.n_layers is not None else cfg.n_encoder_layers
    n_decoder_layers = cfg.n_layers if cfg.n_layers is not None else cfg.n_decoder_layers
    return Transformer(
        src_vocab_size, tgt_vocab_size,
        d_model=cfg.d_model, n_heads=cfg.n_heads,
        n_encoder_layers=n_encoder_layers, n_decoder_layers=n_decoder_layers,
        d_ff=cfg.d_ff, dropout=cfg.dropout, norm_first=cfg.norm_first,
        share_embeddings=cfg.share_embeddings, pad_id=cfg.pad_id, max_len=cfg.max_len,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
        scale_embedding=cfg.scale_embedding, output_bias=cfg.output_bias,
        token_dropout=cfg.token_dropout, **parts,
    )


@contextmanager
def keep_attention_weights(model: nn.Module) -> Iterator[dict[str, MultiHeadAttention]]:
    """Within the block, every attention module keeps its last weights (B, h, Tq, Tk) in
    ``.last_weights``; yields the modules by name (``encoder.layers.0.self_attn``, ...).
    Modules of ``model/attention`` entries that are not MultiHeadAttentions are left out."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    for module in modules.values():
        module.keep_weights = True
    try:
        yield modules
    finally:
        for module in modules.values():
            module.keep_weights, module.last_weights = False, None


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

