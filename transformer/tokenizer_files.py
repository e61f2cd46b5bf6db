"""Your own tokenizer (``data.tokenizer=PATH``): a Hugging Face ``tokenizer.json`` or a
SentencePiece ``.model``, used instead of the BPE that training would learn.

The framework's ids are fixed: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3 (model,
loss, decoding and exports rely on them). A file's own special tokens are mapped onto
these: its vocabulary is renumbered so that its padding, start, end and unknown tokens
(found by their usual names: ``<pad>``/``[PAD]``, ``<s>``/``[CLS]``/``<bos>``,
``</s>``/``[SEP]``/``<eos>``, ``<unk>``/``[UNK]``) take ids 0-3 under our names, a missing
one is added, and every other token keeps its place in the file's order after them. The
text is split into exactly the same pieces as by the file's tokenizer; only the ids
differ. The result is an ordinary ``Tokenizer``: stored whole in checkpoints, hashed into
the data cache's key, exported like the learned one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import tokenizers

from transformer.config import ConfigError
from transformer.tokenizer import SPECIAL_TOKENS, Tokenizer

# Our special tokens, in id order, each with the names other tokenizers give it.
ALIASES = {"<pad>": ("<pad>", "[PAD]", "<PAD>"),
           "<s>": ("<s>", "[CLS]", "<bos>", "<BOS>", "[BOS]"),
           "</s>": ("</s>", "[SEP]", "<eos>", "<EOS>", "[EOS]"),
           "<unk>": ("<unk>", "[UNK]", "<UNK>")}


def load_tokenizer_file(path: str | Path, key: str = "data.tokenizer") -> Tokenizer:
    """The tokenizer in ``path`` (``tokenizer.json`` or SentencePiece ``.model``), its special
    tokens at our ids; ConfigError naming ``key`` if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file (a tokenizer.json or a SentencePiece "
                          ".model)")
    try:
        if path.suffix == ".model":
            original = _from_sentencepiece(path)
        else:
            original = tokenizers.Tokenizer.from_file(str(path))
    except ConfigError:
        raise
    except Exception as error:  # tokenizers and protobuf raise plain Exceptions
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(f"{key}={path}: cannot read it as a tokenizer "
                          f"({type(error).__name__}: {reason})") from None
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(with_our_specials(
        json.loads(original.to_str()), f"{key}={path}"))))


def _from_sentencepiece(path: Path) -> tokenizers.Tokenizer:
    """A unigram SentencePiece model as a ``tokenizers`` one (the same pieces), through
    the converter that ``tokenizers`` ships; it reads the model with the protobuf classes
    that the ``sentencepiece`` package ships, under the module name it imports."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise ConfigError(f"reading {path} needs the sentencepiece and protobuf packages "
                          f"(pip install sentencepiece protobuf): {error}") from None
    from tokenizers.implementations import SentencePieceUnigramTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise ConfigError(f"{path} is a SentencePiece {kind} model; SentencePiece models "
                          "are read for the unigram type (its default) only: train it "
                          "with model_type=unigram, or give a tokenizer.json")
    sys.modules.setdefault("sentencepiece_model_pb2", sentencepiece_model_pb2)
    return SentencePieceUnigramTokenizer.from_spm(str(path))._tokenizer


def with_our_specials(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """``spec`` (a ``tokenizer.json`` as a dict) renumbered: ``<pad>``, ``<s>``, ``</s>``,
    ``<unk>`` at 0-3 (renamed from the file's names, or added), the rest in order after."""
    model = spec["model"]
    if model["type"] == "Unigram":
        old_tokens = [piece for piece, _ in model["vocab"]]
    elif isinstance(model.get("vocab"), dict):  # BPE, WordPiece, WordLevel
        old_tokens = sorted(model["vocab"], key=model["vocab"].get)
    else:
        raise ConfigError(f"{where}: a {model['type']} tokenizer has no vocabulary to map")
    if model["type"] == "Unigram" and model.get("unk_id") is not None:
        unk_name = old_tokens[model["unk_id"]]  # whatever the file calls it
    else:
        unk_name = model.get("unk_token")
    present = set(old_tokens)
    theirs = {}  # our special -> the file's token for it (None: add it)
    for ours, names in ALIASES.items():
        found = [name for name in names if name in present]
        if ours == "<unk>" and unk_name in present:
            found = [unk_name]
        theirs[ours] = found[0] if found else None
    renamed = {theirs[ours]: ours for ours in SPECIAL_TOKENS if theirs[ours] is not None}
    taken = set(renamed)
    new_tokens = [*SPECIAL_TOKENS, *(token for token in old_tokens if token not in taken)]
    new_id = {token: index for index, token in enumerate(new_tokens)}

    if model["type"] == "Unigram":
        scores = dict((renamed.get(piece, piece), score) for piece, score in model["vocab"])
        model["vocab"] = [[token, scores.get(token, 0.0)] for token in new_tokens]
        model["unk_id"] = new_id["<unk>"]
    else:
        model["vocab"] = new_id
        if "unk_token" in model:
            model["unk_token"] = "<unk>"
    added = [entry for entry in spec.get("added_tokens") or []
             if entry["content"] not in SPECIAL_TOKENS or entry["content"] in renamed]
    for entry in added:
        entry["content"] = renamed.get(entry["content"], entry["content"])
        entry["id"] = new_id[entry["content"]]
    listed = {entry["content"] for entry in added}
    for token in SPECIAL_TOKENS:
        if token not in listed:
            added.append({"id": new_id[token], "content": token, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True})
    spec["added_tokens"] = sorted(added, key=lambda entry: entry["id"])
    # Ours adds <s> and </s> itself, pads itself, and never truncates.
    spec["post_processor"] = spec["padding"] = spec["truncation"] = None
    return spec


def tokenizers_from_config(cfg: Any) -> tuple[Tokenizer, Tokenizer] | None:
    """``(src, tgt)`` from ``data.tokenizer`` (both sides) or ``data.src_tokenizer`` and
    ``data.tgt_tokenizer``; None when none is set (BPE is learned)."""
    one, src, tgt = cfg.tokenizer, cfg.src_tokenizer, cfg.tgt_tokenizer
    if one is None and src is None and tgt is None:
        return None
    if one is not None and (src is not None or tgt is not None):
        raise ConfigError("data.tokenizer names one tokenizer for both sides; "
                          "data.src_tokenizer / data.tgt_tokenizer one per side: set either")
    if one is not None:
        if not cfg.joint_vocab:
            raise ConfigError("data.tokenizer is one vocabulary for both sides: set "
                              "data.joint_vocab=true, or give data.src_tokenizer and "
                              "data.tgt_tokenizer")
        tokenizer = load_tokenizer_file(one)
        return tokenizer, tokenizer
    if src is None or tgt is None:
        missing = "data.tgt_tokenizer" if src is not None else "data.src_tokenizer"
        raise ConfigError(f"{missing} is not set: give both sides' tokenizers, or "
                          "data.tokenizer for one shared by both")
    if cfg.joint_vocab:
        raise ConfigError("data.src_tokenizer and data.tgt_tokenizer are two vocabularies: "
                          "set data.joint_vocab=false")
    return (load_tokenizer_file(src, "data.src_tokenizer"),
            load_tokenizer_file(tgt, "data.tgt_tokenizer"))
