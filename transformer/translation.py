"""Lists of sentences (or of token ids) through the searches of ``transformer.decoding``:
``translate(model, tokenizer, sentences)`` tokenizes, sorts by length, batches by
``max_tokens`` padded source tokens, decodes each batch (beam search, greedy, or sampling)
and detokenizes, in input order; ``translate_nbest`` keeps each sentence's n-best list
with its scores; ``search_ids`` / ``translate_ids`` do the same on token ids."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor

from transformer.config import ConfigError
from transformer.decoding import Hypothesis, beam_search, greedy_search, sample_search
from transformer.ensemble import Ensemble
from transformer.model import Transformer
from transformer.precision import Precision
from transformer.sampling import Sampler
from transformer.tokenizer import EOS_ID, PAD_ID

log = logging.getLogger("transformer.decoding")


class TextTokenizer(Protocol):
    """What ``translate`` needs of a tokenizer (``transformer.tokenizer.Tokenizer``)."""

    def encode_batch(self, sentences: list[str]) -> list[list[int]]: ...

    def decode_batch(self, token_lists: list[list[int]]) -> list[str]: ...


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths``, longest first, in batches of at most ``max_tokens`` padded
    tokens (a longer sentence goes alone). Similar lengths batch together: less padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # Longest first: the batch's first sentence sets its padded length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pad_batch(token_lists: list[list[int]], pad_id: int, device: torch.device) -> Tensor:
    """Right-padded (B, S_max) long tensor."""
    src_tokens = torch.full((len(token_lists), max(map(len, token_lists))), pad_id,
                            dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        src_tokens[row, : len(tokens)] = torch.tensor(tokens)
    return src_tokens.to(device)


def n_best_hypotheses(model: Transformer | Ensemble, src_tokens: Tensor, beam: int,
                      lenpen: float, n_best: int = 1, sampler: Sampler | None = None,
                      sentence_ids: list[int] | None = None, **search_kwargs: Any
                      ) -> list[list[Hypothesis]]:
    """The ``n_best`` best hypotheses of each of ``src_tokens`` (B, S): beam search,
    greedy at beam 1, or one sample with a ``sampler`` (``sentence_ids``: its streams)."""
    check_n_best(n_best, beam, sampler)
    if sampler is not None:
        return [[h] for h in sample_search(model, src_tokens, sampler, sentence_ids,
                                           **search_kwargs)]
    if beam == 1:
        return [[h] for h in greedy_search(model, src_tokens, **search_kwargs)]
    return beam_search(model, src_tokens, beam=beam, lenpen=lenpen, n_best=n_best,
                       **search_kwargs)


def best_hypotheses(model: Transformer | Ensemble, src_tokens: Tensor, beam: int, lenpen: float,
                    **search_kwargs: Any) -> list[Hypothesis]:
    """The best hypothesis of each of ``src_tokens`` (B, S): beam search, greedy at beam 1
    (sampling with a ``sampler``)."""
    return [n_best[0] for n_best in n_best_hypotheses(model, src_tokens, beam, lenpen,
                                                      **search_kwargs)]


def check_n_best(nbest: int, beam: int, sampler: Sampler | None) -> None:
    """ConfigError naming ``nbest`` (evaluate.py's key) for a number the search cannot give."""
    if sampler is not None and nbest != 1:
        raise ConfigError(f"nbest={nbest}: sampling draws one hypothesis a sentence "
                          "(nbest > 1 needs beam search)")
    if not 1 <= nbest <= beam:
        raise ConfigError(f"nbest={nbest} must be in [1, beam={beam}]")


@torch.inference_mode()
def search_ids(model: Transformer | Ensemble, src_ids: list[list[int]], beam: int = 5,
               lenpen: float = 0.6, max_tokens: int = 8192, n_best: int = 1,
               prefix_tokens: list[list[int]] | None = None,
               on_batch: Callable[[int], None] | None = None, **search_kwargs: Any
               ) -> list[list[Hypothesis]]:
    """Token ids in (each ``tokens + [EOS]``), the ``n_best`` best hypotheses of each out,
    in order. Sorted by length and batched by ``max_tokens`` padded source tokens; a
    source with no token before EOS gives one empty hypothesis without running the model.
    ``prefix_tokens``: one forced target prefix a source. A ``sampler`` in
    ``search_kwargs`` draws source i from its random stream i (``sample_search``). Runs on
    the model's device, in the caller's precision (autocast stays the caller's choice).
    ``on_batch(n)``: called after each batch of n sources (a progress bar)."""
    eos_id, pad_id = search_kwargs.get("eos_id", EOS_ID), search_kwargs.get("pad_id", PAD_ID)
    check_n_best(n_best, beam, search_kwargs.get("sampler"))
    if prefix_tokens is not None and len(prefix_tokens) != len(src_ids):
        raise ValueError(f"{len(prefix_tokens)} prefixes for {len(src_ids)} sources")
    device = next(model.parameters()).device
    todo = [i for i, ids in enumerate(src_ids) if ids and ids != [eos_id]]
    outputs = [[Hypothesis([], 0.0, 0.0)] for _ in src_ids]
    for batch in token_batches([len(src_ids[i]) for i in todo], max_tokens):
        indices = [todo[j] for j in batch]
        src_tokens = pad_batch([src_ids[i] for i in indices], pad_id, device)
        if prefix_tokens is not None:
            search_kwargs["prefix_tokens"] = [prefix_tokens[i] for i in indices]
        if search_kwargs.get("sampler") is not None:
            search_kwargs["sentence_ids"] = indices
        hypotheses = n_best_hypotheses(model, src_tokens, beam, lenpen, n_best, **search_kwargs)
        for i, n_best_list in zip(indices, hypotheses, strict=True):
            outputs[i] = n_best_list
        if on_batch is not None:
            on_batch(len(indices))
    return outputs


def translate_ids(model: Transformer | Ensemble, src_ids: list[list[int]], beam: int = 5,
                  lenpen: float = 0.6, max_tokens: int = 8192,
                  **search_kwargs: Any) -> list[list[int]]:
    """Token ids in (each ``tokens + [EOS]``), the best hypothesis's tokens out (without
    BOS and EOS), in order: ``search_ids``'s best (``on_batch`` and the other options
    go to it)."""
    return [n_best[0].tokens for n_best in search_ids(model, src_ids, beam, lenpen, max_tokens,
                                                      **search_kwargs)]


def translate(model: Transformer | Ensemble, tokenizer: TextTokenizer, sentences: list[str],
              beam: int = 5, lenpen: float = 0.6, max_tokens: int = 8192,
              device: torch.device | str | None = None, precision: str = "auto",
              first_line: int = 1, **search_kwargs: Any) -> list[str]:
    """Translate ``sentences``, in order: the best of ``translate_nbest``."""
    return [n_best[0].text or "" for n_best in translate_nbest(
        model, tokenizer, sentences, 1, beam, lenpen, max_tokens, device, precision,
        first_line, **search_kwargs)]


def translate_nbest(model: Transformer | Ensemble, tokenizer: TextTokenizer,
                    sentences: list[str], nbest: int = 1, beam: int = 5, lenpen: float = 0.6,
                    max_tokens: int = 8192, device: torch.device | str | None = None,
                    precision: str = "auto", first_line: int = 1,
                    prefixes: str | list[str] | None = None, **search_kwargs: Any
                    ) -> list[list[Hypothesis]]:
    """Translate ``sentences``, in order, into their ``nbest`` best hypotheses each, best
    first, with their ``text``: tokenize (+ EOS), ``search_ids`` (beam 1: greedy; a
    ``sampler=transformer.sampling.Sampler(...)``: sampling), detokenize. Empty sentences
    give "" without reaching the tokenizer or the model. A sentence longer than the
    model's ``max_len`` tokens (EOS included) is cut to its first ``max_len - 1`` tokens +
    EOS, with a warning naming its line (``first_line``: the line number of
    ``sentences[0]``). ``prefixes``: the text each translation must start with, one for
    all sentences or one a sentence (tokenized by the target side's tokenizer).
    ``device``: where to run (the model moves there); None: the model's device.
    ``precision``: the autocast dtype, as ``trainer.precision`` (auto: bf16 on CUDA, fp32
    on the CPU). ``search_kwargs`` go to the search (max_len_a, max_len_b, min_len,
    no_repeat_ngram_size, bos_id, eos_id, pad_id, ``on_batch`` for a progress bar, ...)."""
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    outputs = [[Hypothesis([], 0.0, 0.0, text="")] for _ in sentences]
    todo = [i for i, sentence in enumerate(sentences) if sentence.strip()]
    if not todo:
        return outputs
    eos_id = search_kwargs.get("eos_id", EOS_ID)
    src_ids = [ids + [eos_id] for ids in tokenizer.encode_batch([sentences[i] for i in todo])]
    src_ids = [truncated(ids, model.max_len, eos_id, first_line + i)
               for i, ids in zip(todo, src_ids, strict=True)]
    if prefixes is not None:
        search_kwargs["prefix_tokens"] = prefix_ids(tokenizer, prefixes, sentences, todo)
    with Precision.resolve(precision, device, training=False).autocast():
        hypotheses = search_ids(model, src_ids, beam, lenpen, max_tokens, nbest, **search_kwargs)
    texts = iter(tokenizer.decode_batch([h.tokens for n_best in hypotheses for h in n_best]))
    for i, n_best in zip(todo, hypotheses, strict=True):
        outputs[i] = [replace(h, text=next(texts)) for h in n_best]
    return outputs


def prefix_ids(tokenizer: TextTokenizer, prefixes: str | list[str], sentences: list[str],
               todo: list[int]) -> list[list[int]]:
    """The target token ids of the prefixes of ``sentences[i]`` for i in ``todo``:
    ``prefixes`` is one text for all or one a sentence. A ``TokenizerPair`` encodes them
    with its target side (``.tgt``); a joint tokenizer is both sides."""
    if isinstance(prefixes, str):
        prefixes = [prefixes] * len(sentences)
    if len(prefixes) != len(sentences):
        raise ValueError(f"{len(prefixes)} prefixes for {len(sentences)} sentences")
    target = getattr(tokenizer, "tgt", tokenizer)
    return target.encode_batch([prefixes[i] for i in todo])


def truncated(src_ids: list[int], max_len: int, eos_id: int, line: int) -> list[int]:
    """``src_ids`` (tokens + EOS) cut to ``max_len`` ids, EOS kept last: the encoder has
    no position beyond ``max_len``. One long line of a file is translated in part, with a
    warning, rather than ending the run (Hugging Face's tokenizers truncate likewise)."""
    if len(src_ids) <= max_len:
        return src_ids
    log.warning("line %d: %d source tokens (EOS included), more than the model's max_len=%d: "
                "translating its first %d tokens only", line, len(src_ids), max_len, max_len - 1)
    return src_ids[: max_len - 1] + [eos_id]
