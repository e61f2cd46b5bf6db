"""A checkpoint as a CTranslate2 model, for fast CPU/GPU inference with int8 weights
(``scripts/export_ctranslate2.py``; ``pip install -e ".[deploy]"``).

``export_ctranslate2(checkpoint, out_dir, quantization=None)`` fills CTranslate2's
``TransformerSpec`` from the model's modules (``build_spec``) and writes it through a
``ctranslate2.converters.Converter``, so CTranslate2's own code validates, quantizes and
saves it. Beside its files (``model.bin``, ``config.json``, ``*_vocabulary.json``) go our
tokenizer (``tokenizer.json``, or ``tokenizer_src.json`` and ``tokenizer_tgt.json``; a
Marian model's ``source.spm`` and ``target.spm`` too) and ``transformer.json``, which says
which tokenizer files are which and the decoding settings the model was evaluated with.

How our model maps onto the spec:

* embeddings times sqrt(d_model) (``scale_embeddings``, off for models that do not scale);
  added positions as an explicit table (``position_encodings/encodings``), whatever their
  kind: CTranslate2's built-in sinusoids are tensor2tensor's (position + 1, a different
  frequency step, sines then cosines), not the paper's interleaved ones; RoPE as
  ``rotary_dim=0`` (every dimension), ``rotary_interleave`` (pairs (2i, 2i+1), ours);
* each attention's q, k, v projections fused into one matrix (self-attention) or q and a
  fused k, v (cross-attention), as the converters of fairseq and OpenNMT-py do;
* post-norm or pre-norm (``pre_norm``; pre-norm stacks end with a norm), LayerNorm or
  RMSNorm (``rms_norm``) with the model's epsilon; ReLU, GELU (erf), SiLU, or SwiGLU
  (``ffn_glu`` with SiLU: ``linear_0`` the gate, ``linear_0_noact`` the up projection);
* the vocabulary as token strings, our ids in order, with the config's ``<s>``, ``</s>``
  and ``<unk>`` set to the strings at our BOS, EOS and UNK ids, and ``add_source_eos`` (our
  sources end with EOS).

What the spec cannot hold is refused with ``UnsupportedModel`` naming the option: ALiBi
(CTranslate2 has it in decoders only), a RoPE head size that is odd, or a part that is not
one of this package's classes above.

Decoding the same way as ``transformer.decoding.beam_search(..., early_stopping=True)``:
``translate_ctranslate2`` (``length_penalty``, whose length counts EOS in both; our
per-sentence maximum length). CTranslate2 stops a sentence once it has ``beam`` finished
hypotheses (with a length penalty), which is our ``early_stopping``. Two differences remain:

* a hypothesis that reaches the maximum length ends with a forced EOS here (fairseq's rule)
  and without one in CTranslate2;
* we never extend a hypothesis with PAD or BOS; CTranslate2 could, but a trained model
  gives them no probability (they are never targets). Suppressing them there
  (``suppress_sequences``) would remove them before the softmax, where we remove them
  after it: the scores would differ by log(1 - p(PAD) - p(BOS)) a step.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from transformer.alibi import ALiBiPositions
from transformer.attention import MultiHeadAttention
from transformer.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from transformer.components import class_path
from transformer.config import EvalConfig
from transformer.export import read_tokenizers, write_tokenizers
from transformer.feed_forward import FeedForward
from transformer.model import Transformer
from transformer.positional import PositionalEncoding
from transformer.rmsnorm import RMSNorm
from transformer.rotary import RotaryPositions
from transformer.swiglu import SwiGLU
from transformer.tokenizer import BOS_ID, EOS_ID, UNK_ID

SETTINGS = "transformer.json"  # our part of the exported folder
INSTALL_HINT = 'pip install -e ".[deploy]"'


class UnsupportedModel(ValueError):
    """A model option that CTranslate2's TransformerSpec cannot express; names the key."""


def import_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise UnsupportedModel(f"exporting to CTranslate2 needs the ctranslate2 package: "
                               f"{INSTALL_HINT}") from None
    return ctranslate2


def part_name(key: str, module: nn.Module) -> str:
    return f"{key} ({class_path(type(module))})"


def activation(ffn: nn.Module) -> tuple[int, bool]:
    """(CTranslate2's activation, whether the FFN is gated) of a feed-forward module."""
    from ctranslate2.specs.common_spec import Activation

    if type(ffn) is SwiGLU:
        return Activation.SWISH, True
    known = {F.relu: Activation.RELU, F.gelu: Activation.GELU, F.silu: Activation.SWISH}
    if type(ffn) is not FeedForward or ffn.activation not in known:
        raise UnsupportedModel(f"{part_name('model.ffn', ffn)}: CTranslate2 takes "
                               "FeedForward with relu, gelu or silu, or SwiGLU")
    return known[ffn.activation], False


def norm_options(norms: list[nn.Module]) -> tuple[bool, float]:
    """(rms_norm, epsilon) shared by every norm of the model (the spec has one of each)."""
    unknown = [norm for norm in norms if type(norm) not in (nn.LayerNorm, RMSNorm)]
    if unknown or len({type(norm) for norm in norms}) > 1:
        raise UnsupportedModel(f"{part_name('model.norm', (unknown or norms)[0])}: CTranslate2 "
                               "takes LayerNorm or RMSNorm, one kind for the whole model")
    if any(isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine for norm in norms):
        raise UnsupportedModel("model.norm: a LayerNorm without weights "
                               "(elementwise_affine=false); CTranslate2's has them")
    epsilons = {float(norm.eps) for norm in norms}
    if len(epsilons) > 1:
        raise UnsupportedModel(f"model.norm: epsilons {sorted(epsilons)} differ between "
                               "layers; CTranslate2 has one layer_norm_epsilon")
    return isinstance(norms[0], RMSNorm), epsilons.pop()


def position_options(positions: nn.Module, d_k: int) -> dict[str, Any]:
    """The spec's arguments for the model's positions: none for an added table (written
    as it is, ``set_embeddings``), the rotary ones for RoPE."""
    if isinstance(positions, ALiBiPositions):
        raise UnsupportedModel(f"{part_name('model.positional', positions)}: CTranslate2 has "
                               "ALiBi in decoders only, not in the encoder of a TransformerSpec")
    if isinstance(positions, RotaryPositions):
        if d_k % 2:
            raise UnsupportedModel(f"{part_name('model.positional', positions)}: head size "
                                   f"d_model/n_heads={d_k} is odd, which CTranslate2's rotary "
                                   "embeddings do not leave a dimension of")
        # rotary_dim 0: every dimension; interleaved: the pairs (2i, 2i+1), as ours
        return {"rotary_dim": 0, "rotary_interleave": True, "rotary_base": positions.base}
    if type(positions) is not PositionalEncoding:
        raise UnsupportedModel(f"{part_name('model.positional', positions)}: CTranslate2 "
                               "takes added position tables (sinusoidal, learned) or RoPE")
    return {}


def spec_options(model: Transformer) -> tuple[dict[str, Any], float]:
    """(the keyword arguments of both stacks' specs, the norms' epsilon); UnsupportedModel
    names what the spec lacks."""
    encoder, decoder = model.encoder.layers, model.decoder.layers
    attentions = [layer.self_attn for layer in encoder] + \
        [m for layer in decoder for m in (layer.self_attn, layer.cross_attn)]
    for attention in attentions:
        if type(attention) is not MultiHeadAttention:
            raise UnsupportedModel(f"{part_name('model.attention', attention)}: CTranslate2 "
                                   "takes transformer.attention.MultiHeadAttention only")
    norms = [block.norm for layer in encoder for block in (layer.attn_block, layer.ff_block)]
    norms += [block.norm for layer in decoder
              for block in (layer.self_block, layer.cross_block, layer.ff_block)]
    norms += [n for n in (model.encoder.final_norm, model.decoder.final_norm)
              if not isinstance(n, nn.Identity)]  # pre-norm stacks end with a norm
    rms_norm, epsilon = norm_options(norms)
    kinds = {activation(layer.feed_forward) for layer in [*encoder, *decoder]}
    if len(kinds) > 1:
        raise UnsupportedModel("model.ffn: the layers use different activations")
    (act, glu), = kinds
    options = position_options(model.encoder.embedding.positions, attentions[0].d_k)
    options.update(num_heads=attentions[0].n_heads, pre_norm=encoder[0].attn_block.norm_first,
                   activation=act, ffn_glu=glu, rms_norm=rms_norm)
    return options, epsilon


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def set_linear(spec, linear: nn.Linear) -> None:
    spec.weight = to_numpy(linear.weight)
    if linear.bias is not None:
        spec.bias = to_numpy(linear.bias)


def set_fused(spec, linears: list[nn.Linear]) -> None:
    """Several projections of the same input as one (rows stacked), as CTranslate2 runs
    q, k, v of self-attention (and k, v of cross-attention) in one product."""
    spec.weight = np.concatenate([to_numpy(linear.weight) for linear in linears])
    if linears[0].bias is not None:
        spec.bias = np.concatenate([to_numpy(linear.bias) for linear in linears])


def set_norm(spec, norm: nn.Module) -> None:
    spec.gamma = to_numpy(norm.weight)
    if hasattr(spec, "beta"):  # LayerNorm; RMSNorm has no bias
        bias = getattr(norm, "bias", None)
        spec.beta = to_numpy(bias) if bias is not None else np.zeros_like(spec.gamma)


def set_attention(spec, attention: MultiHeadAttention, norm: nn.Module, self_attention: bool
                  ) -> None:
    if self_attention:
        set_fused(spec.linear[0], [attention.q_proj, attention.k_proj, attention.v_proj])
    else:
        set_linear(spec.linear[0], attention.q_proj)
        set_fused(spec.linear[1], [attention.k_proj, attention.v_proj])
    set_linear(spec.linear[-1], attention.out_proj)
    set_norm(spec.layer_norm, norm)


def set_ffn(spec, ffn: nn.Module, norm: nn.Module) -> None:
    if isinstance(ffn, SwiGLU):  # down(silu(gate(x)) * up(x))
        set_linear(spec.linear_0, ffn.gate)
        set_linear(spec.linear_0_noact, ffn.up)
        set_linear(spec.linear_1, ffn.down)
    else:
        set_linear(spec.linear_0, ffn.linear1)
        set_linear(spec.linear_1, ffn.linear2)
    set_norm(spec.layer_norm, norm)


def set_embeddings(spec, embedding: nn.Module) -> None:
    """Token embeddings, their scale and (if added, not rotary) the position table."""
    tokens = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    tokens.weight = to_numpy(embedding.tokens.weight)
    # CTranslate2 reads True as sqrt(d_model), a float as itself, False as no scaling.
    spec.scale_embeddings = bool(embedding.scale != 1.0)
    if isinstance(embedding.positions, PositionalEncoding):
        spec.position_encodings.encodings = to_numpy(embedding.positions.table)


def build_spec(model: Transformer, src_vocab: Sequence[str], tgt_vocab: Sequence[str]):
    """CTranslate2's ``TransformerSpec`` holding ``model``'s weights, with the token
    strings of each side's ids; UnsupportedModel names an option it cannot hold."""
    import_ctranslate2()
    from ctranslate2.specs import transformer_spec

    options, epsilon = spec_options(model)
    encoder = transformer_spec.TransformerEncoderSpec(len(model.encoder.layers), **options)
    decoder = transformer_spec.TransformerDecoderSpec(len(model.decoder.layers), **options)
    set_embeddings(encoder, model.encoder.embedding)
    set_embeddings(decoder, model.decoder.embedding)
    for spec, layer in zip(encoder.layer, model.encoder.layers, strict=True):
        set_attention(spec.self_attention, layer.self_attn, layer.attn_block.norm, True)
        set_ffn(spec.ffn, layer.feed_forward, layer.ff_block.norm)
    for spec, layer in zip(decoder.layer, model.decoder.layers, strict=True):
        set_attention(spec.self_attention, layer.self_attn, layer.self_block.norm, True)
        set_attention(spec.attention, layer.cross_attn, layer.cross_block.norm, False)
        set_ffn(spec.ffn, layer.feed_forward, layer.ff_block.norm)
    if options["pre_norm"]:
        set_norm(encoder.layer_norm, model.encoder.final_norm)
        set_norm(decoder.layer_norm, model.decoder.final_norm)
    set_linear(decoder.projection, model.output_projection)
    spec = transformer_spec.TransformerSpec(encoder, decoder)
    check_vocabulary("source", src_vocab, model.encoder.embedding.tokens.num_embeddings)
    check_vocabulary("target", tgt_vocab, model.output_projection.out_features)
    spec.register_source_vocabulary(list(src_vocab))
    spec.register_target_vocabulary(list(tgt_vocab))
    # Our special ids, by the strings the vocabulary has there.
    spec.config.bos_token = spec.config.decoder_start_token = tgt_vocab[BOS_ID]
    spec.config.eos_token = tgt_vocab[EOS_ID]
    spec.config.unk_token = tgt_vocab[UNK_ID]
    spec.config.add_source_eos = True  # our sources are tokens + EOS
    spec.config.layer_norm_epsilon = epsilon
    return spec


def check_vocabulary(side: str, vocab: Sequence[str], size: int) -> None:
    """CTranslate2 maps token strings to ids: each must be unique, one per embedding row."""
    if len(vocab) != size:
        raise UnsupportedModel(f"the {side} vocabulary has {len(vocab)} tokens but the model "
                               f"{size} embeddings")
    if len(set(vocab)) != len(vocab):
        seen: set[str] = set()
        duplicate = next(token for token in vocab if token in seen or seen.add(token))
        raise UnsupportedModel(f"the {side} vocabulary has {duplicate!r} twice; CTranslate2 "
                               "needs one string per id")


def vocabularies(entry: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The token strings of each side's ids, from a checkpoint's tokenizer entry: the BPE
    tokens as ``tokenizers`` spells them (``Ġ`` for a space), or a Marian model's
    SentencePiece pieces (ids without a piece get ``<unused:ID>``)."""
    if entry.get("kind") == "marian":
        fields = json.loads(entry["src"])
        src = fields["src_pieces"]
        tgt = fields["tgt_pieces"] or src
        return unique_pieces(src), unique_pieces(tgt)
    import tokenizers

    def tokens(text: str) -> list[str]:
        tokenizer = tokenizers.Tokenizer.from_str(text)
        return [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]

    src = tokens(entry["src"])
    return src, tokens(entry["tgt"]) if entry["tgt"] else src


def unique_pieces(pieces: list[str]) -> list[str]:
    return [piece if piece else f"<unused:{i}>" for i, piece in enumerate(pieces)]


def converter(model: Transformer, src_vocab: Sequence[str], tgt_vocab: Sequence[str]):
    """A ``ctranslate2.converters.Converter`` of ``model``: ``.convert(out_dir,
    quantization=...)`` validates, quantizes and writes it."""
    from ctranslate2.converters import Converter

    class TransformerConverter(Converter):
        def _load(self):
            return build_spec(model, src_vocab, tgt_vocab)

    return TransformerConverter()


def export_ctranslate2(checkpoint: str | Path | dict[str, Any], out_dir: str | Path,
                       quantization: str | None = None, trust_modules: Sequence[str] = (),
                       name: str = "the checkpoint") -> Path:
    """Write ``checkpoint`` (a file, a run directory, a ``scripts/export.py`` folder, or a
    state in memory named ``name``) as a CTranslate2 model in ``out_dir`` (new or empty),
    with our tokenizer. ``quantization``: CTranslate2's weight type (int8, int8_float16,
    float16, ...; None keeps float32). The files go to a hidden folder beside ``out_dir``,
    renamed to it once all are written."""
    import_ctranslate2()  # missing: one line before the slow load
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir} exists and is not an empty folder: choose another "
                              "or remove it")
    in_memory = isinstance(checkpoint, dict)
    state = checkpoint if in_memory else read_checkpoint(checkpoint)
    model, _, cfg = load_checkpoint(state, name=name if in_memory else str(checkpoint),
                                    trust_modules=trust_modules)
    return write_ctranslate2(state, model, cfg, out_dir, quantization)


def write_ctranslate2(state: dict[str, Any], model: Transformer, cfg: DictConfig,
                      out_dir: Path, quantization: str | None = None) -> Path:
    """``export_ctranslate2`` of a checkpoint ``state`` already loaded by ``load_checkpoint``
    as ``model`` and its training config ``cfg`` (``out_dir`` checked by the caller)."""
    ctranslate2 = import_ctranslate2()
    src_vocab, tgt_vocab = vocabularies(state["tokenizer"])
    search = EvalConfig()  # evaluate.py's length limits
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.no_grad():
            converter(model, src_vocab, tgt_vocab).convert(str(tmp), quantization=quantization,
                                                           force=True)
        settings = {"tokenizer": write_tokenizers(state["tokenizer"], tmp),
                    "step": state.get("step"), "quantization": quantization or "float32",
                    "ctranslate2": ctranslate2.__version__,
                    "decoding": {"beam": cfg.test.beam, "lenpen": cfg.test.lenpen,
                                 "max_len_a": search.max_len_a, "max_len_b": search.max_len_b,
                                 "min_len": search.min_len, "max_len": model.max_len}}
        if state["tokenizer"].get("kind") == "marian":  # for SentencePiece users
            fields = json.loads(state["tokenizer"]["src"])
            for side in ("source", "target"):
                (tmp / f"{side}.spm").write_bytes(base64.b64decode(fields[f"{side}_spm"]))
        (tmp / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir)
    except OSError as error:
        raise CheckpointError(f"could not write {out_dir}: {error.strerror or error}"
                              ) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_ctranslate2(directory: str | Path, device: str = "cpu", compute_type: str = "default",
                     threads: int = 0):
    """``translator, tokenizer, settings`` of an exported folder: a
    ``ctranslate2.Translator``, our tokenizer (``encode_batch``, ``decode_batch``) and
    ``transformer.json``. ``threads``: CTranslate2's intra-op threads (0: its default)."""
    ctranslate2 = import_ctranslate2()
    from transformer.checkpoint import read_tokenizer

    directory = Path(directory)
    path = directory / SETTINGS
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not readable: {error} (not a folder of "
                              "scripts/export_ctranslate2.py?)") from None
    tokenizer = read_tokenizer(read_tokenizers(directory, settings["tokenizer"], path))
    translator = ctranslate2.Translator(str(directory), device=device,
                                        compute_type=compute_type, intra_threads=threads)
    return translator, tokenizer, settings


def max_decoding_lengths(src_lengths: Sequence[int], max_len_a: float, max_len_b: int,
                         max_len: int) -> list[int]:
    """Our ``max_lengths`` (tokens before EOS, EOS counted in the source) plus one:
    CTranslate2's maximum counts EOS."""
    return [min(int(max_len_a * n + max_len_b), max_len - 1) + 1 for n in src_lengths]


def translate_ctranslate2(translator, tokens: Sequence[Sequence[str]], tgt_vocab: Sequence[str],
                          beam: int = 5, lenpen: float = 0.6, max_len_a: float = 1.2,
                          max_len_b: int = 10, min_len: int = 1, max_len: int = 1024,
                          max_batch_size: int = 64,
                          on_batch: Callable[[int], None] | None = None,
                          **options: Any) -> list[list[int]]:
    """Target ids (without BOS and EOS) for source ``tokens`` (strings, without EOS),
    decoded as ``beam_search(..., early_stopping=True)`` (greedy at beam 1) decodes: the
    same length penalty (EOS counted), minimum and per-sentence maximum length. One
    difference: a hypothesis that reaches the maximum ends there with EOS in ours (its
    log-probability counted) and one token longer without EOS in CTranslate2, so where the
    search runs into the limit (a model that repeats itself) the outputs may part.
    ``tgt_vocab``: the target token of each id. Sentences of one maximum length go to
    CTranslate2 together (it takes one a batch); ``options`` go to ``translate_batch``.
    ``on_batch(n)``: called after each such group of n sentences (a progress bar)."""
    ids = {token: i for i, token in enumerate(tgt_vocab)}
    lengths = max_decoding_lengths([len(t) + 1 for t in tokens], max_len_a, max_len_b,
                                   max_len)
    outputs: list[list[int]] = [[] for _ in tokens]
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        if tokens[i]:  # an empty source gives [], as translate_ids does
            groups.setdefault(length, []).append(i)
    for length, indices in groups.items():
        results = translator.translate_batch(
            [list(tokens[i]) for i in indices], beam_size=beam, length_penalty=lenpen,
            max_decoding_length=length, min_decoding_length=min_len,
            max_batch_size=max_batch_size, **options)
        for i, result in zip(indices, results, strict=True):
            outputs[i] = [ids[token] for token in result.hypotheses[0]]
        if on_batch is not None:
            on_batch(len(indices))
    return outputs
