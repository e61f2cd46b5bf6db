"""evaluate.py's search options (``search``, ``temperature``, ``top_k``, ``top_p``,
``seed``, ``nbest``, ``token_scores``, ``prefix``, ``prefix_file``,
``no_repeat_ngram_size``): their checks, what they pass to ``translate_nbest``, the part
of the translations' file name they set, and the n-best JSON lines.

One JSON line per hypothesis, best first within each source line:
``{"id": 0, "rank": 0, "hypothesis": "...", "score": -3.2, "normalized_score": -0.53}``
with ``id`` the 0-based source line, ``rank`` 0 for the best, ``score`` the sum of the
model's log-probabilities of the tokens and EOS, ``normalized_score`` what beam search
ranks by (score / (tokens + 1) ** lenpen; lenpen 1 for greedy and sampling); with
``token_scores=true`` also ``tokens`` (the target subwords, then ``</s>``) and
``token_scores`` (each one's log-probability).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig

from transformer.config import ConfigError, EvalConfig
from transformer.data import read_lines
from transformer.decoding import Hypothesis
from transformer.sampling import Sampler, check_sampling
from transformer.tokenizer import EOS_ID

SEARCHES = ("beam", "greedy", "sample")


def check_search_options(cfg: EvalConfig | DictConfig) -> None:
    """ConfigError naming the key of a value or combination that cannot work."""
    if cfg.search not in SEARCHES:
        raise ConfigError(f"search={cfg.search!r} is not one of {list(SEARCHES)}")
    if cfg.beam < 1:
        raise ConfigError(f"beam={cfg.beam} must be at least 1")
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.nbest < 1:
        raise ConfigError(f"nbest={cfg.nbest} must be at least 1")
    if cfg.nbest > 1 and cfg.search != "beam":
        raise ConfigError(f"nbest={cfg.nbest} needs search=beam (search={cfg.search} gives "
                          "one hypothesis a line)")
    if cfg.nbest > cfg.beam:
        raise ConfigError(f"nbest={cfg.nbest} must be at most beam={cfg.beam}")
    if cfg.no_repeat_ngram_size < 0:
        raise ConfigError(f"no_repeat_ngram_size={cfg.no_repeat_ngram_size} must be >= 0")
    if cfg.early_stopping and cfg.search != "beam":
        raise ConfigError(f"early_stopping=true needs search=beam (search={cfg.search})")
    if cfg.prefix is not None and cfg.prefix_file is not None:
        raise ConfigError("prefix and prefix_file: give one (a text for every line, or a "
                          "file of one prefix a line)")
    if cfg.prefix_file is not None and cfg.mode != "files":
        raise ConfigError(f"prefix_file needs mode=files (one prefix a line of src_file), "
                          f"not mode={cfg.mode}")


def search_kwargs(cfg: EvalConfig | DictConfig) -> dict[str, Any]:
    """The arguments of ``translate_nbest`` that ``cfg``'s search options set."""
    kwargs: dict[str, Any] = {"nbest": cfg.nbest, "beam": 1 if cfg.search == "greedy"
                              else cfg.beam, "no_repeat_ngram_size": cfg.no_repeat_ngram_size}
    if cfg.search == "sample":
        kwargs["sampler"] = Sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    if cfg.early_stopping and kwargs["beam"] > 1:  # beam 1 is greedy: nothing to stop
        kwargs["early_stopping"] = True
    return kwargs


def read_prefixes(cfg: EvalConfig | DictConfig, n_lines: int) -> str | list[str] | None:
    """``prefix``, or the lines of ``prefix_file`` (as many as the source's), or None."""
    if cfg.prefix_file is None:
        return cfg.prefix
    prefixes = read_lines(cfg.prefix_file)
    if len(prefixes) != n_lines:
        raise ConfigError(f"prefix_file={cfg.prefix_file} has {len(prefixes)} lines, "
                          f"src_file {n_lines}: one prefix a source line")
    return prefixes


def search_name(cfg: EvalConfig | DictConfig) -> list[str]:
    """The parts of the translations' file name the search sets: ``beam5.lenpen0.6``
    (``.early`` with early_stopping), ``greedy``, ``sample.temp0.8.topp0.9.seed1``, then
    ``norepeat3`` and ``prefix`` + 8 hex digits of the prefix (text or file) where given."""
    if cfg.search == "beam":
        parts = [f"beam{cfg.beam}", f"lenpen{cfg.lenpen:g}"]
        if cfg.early_stopping:
            parts.append("early")
    elif cfg.search == "greedy":
        parts = ["greedy"]
    else:
        parts = ["sample"]
        if cfg.temperature != 1:
            parts.append(f"temp{cfg.temperature:g}")
        if cfg.top_k:
            parts.append(f"topk{cfg.top_k}")
        if cfg.top_p < 1:
            parts.append(f"topp{cfg.top_p:g}")
        parts.append(f"seed{cfg.seed}")
    if cfg.no_repeat_ngram_size:
        parts.append(f"norepeat{cfg.no_repeat_ngram_size}")
    if cfg.prefix is not None or cfg.prefix_file is not None:
        text = cfg.prefix if cfg.prefix is not None else "\n".join(read_lines(cfg.prefix_file))
        parts.append("prefix" + hashlib.sha1(text.encode()).hexdigest()[:8])
    return parts


def wants_json(cfg: EvalConfig | DictConfig) -> bool:
    """Whether the hypotheses go out as JSON lines: n-best lists or token scores."""
    return cfg.nbest > 1 or cfg.token_scores


def json_lines(hypotheses: list[list[Hypothesis]], tokenizer: Any, token_scores: bool,
               first_id: int = 0) -> Iterator[str]:
    """The n-best JSON lines (module doc) of ``hypotheses``, one list a source line."""
    target = getattr(tokenizer, "tgt", tokenizer)  # a TokenizerPair's target side
    for line, n_best in enumerate(hypotheses, start=first_id):
        for rank, hypothesis in enumerate(n_best):
            record = {"id": line, "rank": rank, "hypothesis": hypothesis.text,
                      "score": hypothesis.logprob, "normalized_score": hypothesis.score}
            if token_scores:  # an empty line has neither tokens nor EOS scored
                eos = [EOS_ID] if hypothesis.token_logprobs else []
                record["tokens"] = target.id_tokens(hypothesis.tokens + eos)
                record["token_scores"] = hypothesis.token_logprobs
            yield json.dumps(record, ensure_ascii=False)
