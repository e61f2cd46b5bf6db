"""Importing OPUS-MT (Marian) models saved by Hugging Face's ``MarianMTModel``.

``convert_marian(directory) -> checkpoint state`` reads a ``save_pretrained`` directory
(``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, ``source.spm``,
``target.spm``, ``vocab.json``) and returns a checkpoint in the trainer's format, so
``load_checkpoint``, ``evaluate.py`` and ``translate`` use it like one of ours.

Marian is the paper's post-norm Transformer with a few switches, all ``ModelConfig``
options here: sinusoids laid out [sines | cosines] (``model/positional=sinusoidal_concat``),
unscaled embeddings (``scale_embedding``), a bias on the logits (``output_bias``) and its
own choice of shared embeddings.

Special ids. Our code fixes ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3; Marian has
``</s>``=0, ``<unk>``=1, ``<pad>`` last, and starts the decoder from ``<pad>``. Rather than
carry Marian's ids everywhere, the converter permutes the vocabulary: our id ``i`` is
Marian's id ``marian_ids[i]`` with ``marian_ids = [pad, decoder_start, eos, unk, the others
in order]``. Our ``<s>`` is thus a row of its own holding a copy of Marian's decoder-start
(``<pad>``) embedding, and the vocabulary has one more entry than Marian's. Its logit gets
a bias of ``NEVER`` so that the softmax over the other tokens is Marian's: our
``logits[..., i]`` equals Marian's ``logits[..., marian_ids[i]]`` for every ``i`` but 1.
``MarianTokenizer`` (SentencePiece pieces -> Marian ids -> ours) applies the same map.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from transformer.components import entry
from transformer.config import DataConfig, ModelConfig, TrainConfig, TrainerConfig
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID

NEVER = -1e4  # logit bias of <s>: exp(NEVER + logit) is 0 in float32, bf16 and fp16 alike
ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu"}
# Options of older Marian config.json files, with the only value we (and HF) implement.
FIXED_OPTIONS = {"normalize_before": False, "add_final_layer_norm": False,
                 "normalize_embedding": False, "layernorm_embedding": False,
                 "static_position_embeddings": True, "add_bias_logits": False}
# Hugging Face's MarianConfig defaults: config.json may leave out a key that has them.
DEFAULTS = {"vocab_size": 58101, "max_position_embeddings": 1024, "d_model": 1024,
            "encoder_layers": 12, "decoder_layers": 12, "encoder_ffn_dim": 4096,
            "decoder_ffn_dim": 4096, "encoder_attention_heads": 16,
            "decoder_attention_heads": 16, "activation_function": "gelu", "dropout": 0.1,
            "attention_dropout": 0.0, "activation_dropout": 0.0, "scale_embedding": False,
            "pad_token_id": 58100, "eos_token_id": 0,
            "share_encoder_decoder_embeddings": True, "tie_word_embeddings": True}
# Our parameter names -> Marian's, inside a layer (Hugging Face's names).
LAYER_RENAMES = [("attn_block.norm", "self_attn_layer_norm"),
                 ("self_block.norm", "self_attn_layer_norm"),
                 ("cross_block.norm", "encoder_attn_layer_norm"),
                 ("cross_attn", "encoder_attn"),
                 ("ff_block.norm", "final_layer_norm"),
                 ("feed_forward.linear1", "fc1"),
                 ("feed_forward.linear2", "fc2")]


class MarianConversionError(ValueError):
    """A directory that is not a Marian model, or one with options we do not implement."""


def model_config(config: dict[str, Any]) -> ModelConfig:
    """Our ``ModelConfig`` for a Marian ``config.json``; raise MarianConversionError
    naming every option we do not support."""
    problems = [f"{key}={config[key]!r} (only {value!r} is supported)"
                for key, value in FIXED_OPTIONS.items() if key in config and config[key] != value]
    activation = config["activation_function"]
    if activation not in ACTIVATIONS:
        problems.append(f"activation_function={activation!r} (supported: {sorted(ACTIVATIONS)})")
    for encoder_key, decoder_key in [("encoder_attention_heads", "decoder_attention_heads"),
                                     ("encoder_ffn_dim", "decoder_ffn_dim")]:
        if config[encoder_key] != config[decoder_key]:
            problems.append(f"{encoder_key}={config[encoder_key]} != "
                            f"{decoder_key}={config[decoder_key]} (one value for both stacks)")
    if problems:
        raise MarianConversionError("unsupported Marian options: " + "; ".join(problems))
    return ModelConfig(
        d_model=config["d_model"], n_heads=config["encoder_attention_heads"],
        n_encoder_layers=config["encoder_layers"], n_decoder_layers=config["decoder_layers"],
        d_ff=config["encoder_ffn_dim"], dropout=config["dropout"],
        attention_dropout=config["attention_dropout"],
        activation_dropout=config["activation_dropout"],
        norm_first=False, share_embeddings=share_embeddings(config),
        attention=entry("attention", "mha"), positional=entry("positional", "sinusoidal_concat"),
        norm=entry("norm", "layernorm"), ffn=entry("ffn", ACTIVATIONS[activation]),
        max_len=config["max_position_embeddings"], pad_id=PAD_ID,
        scale_embedding=config["scale_embedding"], output_bias=True)


def share_embeddings(config: dict[str, Any]) -> str:
    """Marian's two switches -> ours. Encoder and decoder embeddings shared but the output
    projection not (rare) gives "none", each holding a copy: the same function."""
    if config["tie_word_embeddings"]:
        return "all" if config["share_encoder_decoder_embeddings"] else "decoder"
    return "none"


def special_ids(config: dict[str, Any], vocab: dict[str, int]) -> dict[str, int]:
    eos = config["eos_token_id"]
    ids = {"pad": config["pad_token_id"], "eos": eos[0] if isinstance(eos, list) else eos,
           "unk": vocab.get("<unk>", 1)}
    ids["start"] = config.get("decoder_start_token_id", ids["pad"])
    if len({ids["pad"], ids["eos"], ids["unk"]}) != 3:
        raise MarianConversionError(f"<pad>, </s> and <unk> must have distinct ids, got {ids}")
    return ids


def permutation(vocab_size: int, ids: dict[str, int]) -> Tensor:
    """``marian_ids`` (vocab_size + 1,): our id i is Marian's id marian_ids[i]."""
    specials = [ids["pad"], ids["start"], ids["eos"], ids["unk"]]
    others = [i for i in range(vocab_size) if i not in (ids["pad"], ids["eos"], ids["unk"])]
    return torch.tensor(specials + others)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MarianConversionError(f"cannot read {path}: {error}") from error


def read_weights(directory: Path) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors`` (or ``pytorch_model.bin``); a file that is
    truncated or corrupt raises MarianConversionError naming it."""
    path = directory / "model.safetensors"
    if path.is_file():
        from safetensors.torch import load_file as load
    else:
        path = directory / "pytorch_model.bin"
        if not path.is_file():
            raise MarianConversionError(f"{directory} holds no model.safetensors or "
                                        "pytorch_model.bin")

        def load(path: Path) -> dict[str, Tensor]:
            return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return load(path)
    except Exception as error:  # safetensors, zip, pickle and OS errors: each its own type
        raise MarianConversionError(f"{path} is truncated or corrupt: {one_line(error)}"
                                    ) from error


def one_line(error: Exception) -> str:
    """An exception's message on one line (PyTorch's span several)."""
    return " ".join(str(error).split())


def check_vocab_sizes(weights: dict[str, Tensor], config: dict[str, Any]) -> None:
    """Refuse a config.json whose ``vocab_size`` (or ``decoder_vocab_size``) is not the
    number of rows of the embeddings: the vocabulary permutation would index past them, or
    silently drop their last rows."""
    decoder_key = "decoder_vocab_size" if config.get("decoder_vocab_size") else "vocab_size"
    for key, side in [("vocab_size", "encoder"), (decoder_key, "decoder")]:
        names = [f"model.{side}.embed_tokens.weight", "model.shared.weight"]
        name = next((name for name in names if name in weights), None)
        if name is not None and weights[name].size(0) != config[key]:
            raise MarianConversionError(
                f"config.json has {key}={config[key]}, but the weights' {name} has "
                f"{weights[name].size(0)} rows: the config does not belong to these weights")


def marian_weight(name: str) -> str:
    """Hugging Face's name for our layer parameter ``name`` (``encoder.layers.0....``)."""
    for ours, theirs in LAYER_RENAMES:
        name = name.replace(ours, theirs)
    return "model." + name


def convert_weights(weights: dict[str, Tensor], config: dict[str, Any], src_ids: Tensor,
                    tgt_ids: Tensor, our_names: Iterable[str]) -> dict[str, Tensor]:
    """Our state dict (``our_names``) from Marian's ``weights``, vocabularies permuted.
    Tied weights may be saved once only, under any of their names: look for each."""

    def first(*names: str) -> Tensor:
        for name in names:
            if name in weights:
                return weights[name]
        raise MarianConversionError(f"the weights hold none of {list(names)}")

    src_embedding = first("model.encoder.embed_tokens.weight", "model.shared.weight")
    tgt_embedding = first("model.decoder.embed_tokens.weight", "model.shared.weight")
    tied = config["tie_word_embeddings"]
    output = tgt_embedding if tied else first("lm_head.weight")
    bias = weights.get("final_logits_bias", torch.zeros(1, output.size(0)))[0, tgt_ids].clone()
    bias[BOS_ID] = NEVER
    converted = {"encoder.embedding.tokens.weight": src_embedding[src_ids],
                 "decoder.embedding.tokens.weight": tgt_embedding[tgt_ids],
                 "output_projection.weight": output[tgt_ids],
                 "output_projection.bias": bias}
    for name in our_names:
        if name not in converted:
            converted[name] = first(marian_weight(name))
    return converted


def convert_marian(directory: str | Path) -> dict[str, Any]:
    """A checkpoint state (the trainer's format, step 0) for the Marian model in
    ``directory``; raise MarianConversionError saying what is missing or unsupported."""
    from transformer.checkpoint import tokenizer_entry
    from transformer.model import build_model

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise MarianConversionError(f"{directory} has no config.json: not a saved Marian model")
    config = read_json(directory / "config.json")
    if config.get("model_type") != "marian":
        raise MarianConversionError(f"{directory} is not a Marian model "
                                    f"(config.json has model_type={config.get('model_type')!r})")
    config = {**DEFAULTS, **{key: value for key, value in config.items() if value is not None}}
    tokenizer, marian_ids = read_tokenizer(directory, config)
    cfg = model_config(config)
    src_size = config["vocab_size"]
    tgt_size = src_size if cfg.share_embeddings == "all" else \
        config.get("decoder_vocab_size") or src_size
    model = build_model(cfg, src_size + 1, tgt_size + 1)
    weights = read_weights(directory)
    check_vocab_sizes(weights, config)
    state_dict = convert_weights(weights, config, marian_ids["src"], marian_ids["tgt"],
                                 model.state_dict().keys())
    try:
        model.load_state_dict(state_dict)  # checks every name and shape
    except RuntimeError as error:
        raise MarianConversionError(f"{directory}: the weights do not fit config.json: "
                                    f"{one_line(error)}") from error
    train_cfg = TrainConfig(model=cfg, trainer=TrainerConfig(max_steps=0),
                            data=DataConfig(max_len=min(256, cfg.max_len - 2)))
    return {"model": model.state_dict(), "step": 0,
            "config": OmegaConf.to_container(OmegaConf.structured(train_cfg)),
            "tokenizer": tokenizer_entry(tokenizer, tokenizer.target_side()),
            "vocab_size": {"src": src_size + 1, "tgt": tgt_size + 1},
            "converted_from": str(directory)}


class MarianTokenizer:
    """Marian's SentencePiece tokenization with our ids: the source model splits the text
    into pieces, the vocabulary maps them to ids (``<unk>`` when absent), and decoding joins
    the pieces back, as Hugging Face's ``MarianTokenizer`` does (no Moses punctuation
    normalization). A leading language code such as ``>>fra<<`` stays one token."""

    kind = "marian"  # how checkpoints name it (``transformer.checkpoint.tokenizer_entry``)
    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, source_spm: bytes, target_spm: bytes, src_pieces: list[str],
                 tgt_pieces: list[str] | None = None, side: str = "source") -> None:
        import sentencepiece

        self.source_spm, self.target_spm = source_spm, target_spm
        self.src_pieces = src_pieces  # our id -> piece
        self.tgt_pieces = tgt_pieces or src_pieces
        self.side = side  # which language ``encode`` reads: "source", or "target" (training)
        spm, self._pieces = (source_spm, self.src_pieces) if side == "source" else \
            (target_spm, self.tgt_pieces)
        self._encoder = sentencepiece.SentencePieceProcessor(model_proto=spm)
        # Hugging Face decodes with the source model unless the vocabularies are separate.
        self._decoder = sentencepiece.SentencePieceProcessor(
            model_proto=target_spm if tgt_pieces else source_spm)
        self._ids = {piece: i for i, piece in reversed(list(enumerate(self._pieces)))}

    def target_side(self) -> MarianTokenizer:
        """The same tokenizer encoding target-language text (with ``target.spm`` and the
        target vocabulary), as Hugging Face's ``text_target=`` does: for training data."""
        return MarianTokenizer(self.source_spm, self.target_spm, self.src_pieces,
                               None if self.tgt_pieces is self.src_pieces else self.tgt_pieces,
                               side="target")

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, text: str) -> list[int]:
        code = re.match(r">>[^<>]+<<", text)
        pieces = [code.group()] if code else []
        pieces += self._encoder.encode(text[code.end():] if code else text, out_type=str)
        return [self._ids.get(piece, UNK_ID) for piece in pieces]

    def id_tokens(self, ids: Sequence[int] | Any) -> list[str]:
        """The piece of each id of this side (attention-map labels)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return [self._pieces[i] for i in ids]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Text of target ``ids`` (a list or 1-d tensor): special tokens are dropped and
        whatever follows the first ``</s>`` is ignored."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        ids = ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids
        pieces = [self.tgt_pieces[i] for i in ids if i >= len(SPECIAL_TOKENS)]
        return self._decoder.decode_pieces(pieces).replace("▁", " ").strip()

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def to_str(self) -> str:
        """The whole tokenizer (both SentencePiece models, both vocabularies) as JSON."""
        return json.dumps({
            "kind": "marian",
            "source_spm": base64.b64encode(self.source_spm).decode("ascii"),
            "target_spm": base64.b64encode(self.target_spm).decode("ascii"),
            "src_pieces": self.src_pieces,
            "tgt_pieces": None if self.tgt_pieces is self.src_pieces else self.tgt_pieces})

    @classmethod
    def from_str(cls, text: str) -> MarianTokenizer:
        fields = json.loads(text)
        return cls(base64.b64decode(fields["source_spm"]), base64.b64decode(fields["target_spm"]),
                   fields["src_pieces"], fields["tgt_pieces"])


def read_tokenizer(directory: Path, config: dict[str, Any]
                   ) -> tuple[MarianTokenizer, dict[str, Tensor]]:
    """The tokenizer of a Marian directory, and the permutation of each side's vocabulary
    (``{"src": marian_ids, "tgt": marian_ids}``, see the module docstring)."""
    files = [directory / name for name in ("source.spm", "target.spm", "vocab.json")]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise MarianConversionError(f"{directory} lacks the tokenizer files {missing}")
    tokenizer_config = directory / "tokenizer_config.json"
    separate = tokenizer_config.is_file() and \
        read_json(tokenizer_config).get("separate_vocabs", False)
    src_vocab = read_json(directory / "vocab.json")
    tgt_vocab = read_json(directory / "target_vocab.json") if separate else src_vocab
    src_size = config["vocab_size"]
    tgt_size = config.get("decoder_vocab_size") or src_size
    marian_ids = {"src": permutation(src_size, special_ids(config, src_vocab)),
                  "tgt": permutation(tgt_size, special_ids(config, tgt_vocab))}
    tokenizer = MarianTokenizer(
        (directory / "source.spm").read_bytes(), (directory / "target.spm").read_bytes(),
        pieces(src_vocab, marian_ids["src"]),
        pieces(tgt_vocab, marian_ids["tgt"]) if separate else None)
    return tokenizer, marian_ids


def pieces(vocab: dict[str, int], marian_ids: Tensor) -> list[str]:
    """The piece of each of our ids; ours for the specials, "" for an id with no piece."""
    by_marian_id = {i: piece for piece, i in vocab.items()}
    return list(SPECIAL_TOKENS) + [by_marian_id.get(i, "") for i in
                                   marian_ids[len(SPECIAL_TOKENS):].tolist()]
