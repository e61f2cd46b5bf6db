"""Greedy and beam search over the decoder's incremental cache (the seed's step 4).

``greedy_search(model, src_tokens (B, S)) -> [Hypothesis] * B`` and
``beam_search(model, src_tokens (B, S)) -> [[Hypothesis] * n_best] * B`` decode a batch of
right-padded sources. The encoder runs once; each step feeds the decoder only the newest
token and reuses the keys/values of earlier positions from a ``DecoderCache``
(``use_cache=False`` recomputes the whole prefix instead: same results, used by the tests).
``sample_search(model, src_tokens, sampler)`` draws each next token at random instead
(temperature, top-k, top-p: ``transformer.sampling``). ``transformer.translation``
wraps them for lists of sentences (``translate``: tokenize, batch by tokens, detokenize;
``translate_nbest``: each sentence's n-best list with scores). Each takes a
``Transformer`` or an ``Ensemble`` of them (``transformer.ensemble``).

Options every search takes (``transformer.search_rules``): ``prefix_tokens``, one forced
target prefix a sentence (the output starts with it; batched, any lengths), and
``no_repeat_ngram_size``. Every ``Hypothesis`` has the model's log-probability of each of
its tokens and EOS (``token_logprobs``): what teacher forcing the hypothesis gives.

Conventions (fairseq's): the source is ``tokens + [EOS]``; a hypothesis starts from BOS
and ends at EOS. At most ``int(max_len_a * src_len + max_len_b)`` tokens are generated
(src_len: the sentence's non-pad source tokens; EOS is forced then) and EOS is forbidden
before ``min_len`` tokens; when the two clash, the maximum wins. Lengths count the
tokens without EOS; the length penalty counts EOS too:
``score = sum of log-probabilities / (len(tokens) + 1) ** lenpen``.

Beam search keeps ``beam`` live hypotheses a sentence. Each step takes the best
``2 * beam`` of the ``beam * V`` extensions: those ending in EOS among the first ``beam``
become finished hypotheses, and the best ``beam`` that do not end in EOS stay live
(fairseq's ``SequenceGenerator``). A sentence stops

* ``early_stopping=False`` (default, exact): once no live hypothesis can still beat the
  ``n_best``-th best finished one, or at its maximum length. Log-probabilities only
  fall as a hypothesis grows, so a live one with sum ``s <= 0`` after ``t`` tokens can at
  best finish as ``s / L**lenpen`` for some ``L`` in ``[t + 2, max_len + 1]``; that
  function of ``L`` is monotonic, so its maximum is at one of the two ends. Stopping
  once the finished score reaches this bound returns the same ``n_best`` as running
  every sentence to its maximum length, and skips only steps that could not change
  them (with lenpen > 0 the bound is loose, as the length may grow to the maximum).
  With lenpen 0, beam 1 gives exactly the greedy output.
* ``early_stopping=True`` (fairseq; Hugging Face's ``early_stopping=True``): once it has
  ``beam`` finished hypotheses, or at its maximum length. Fewer steps, and beam 1 gives
  exactly the greedy output for any lenpen; but on a confident model the other beams'
  poor hypotheses ending in EOS can fill the ``beam`` places before the best one ends
  (a tiny model that memorized its pairs loses tokens this way at beam 4).

Finished sentences leave the batch (their rows of the cache and memory are dropped), so
the batch shrinks as sentences end at different lengths; each sentence's result does not
depend on the others in its batch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.config import ConfigError
from transformer.ensemble import Ensemble
from transformer.model import Transformer
from transformer.sampling import Sampler
from transformer.search_rules import NEG_INF, Rules, SpecialIds, pad_prefixes
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    """One finished translation."""

    tokens: list[int]  # without BOS and EOS; a forced prefix included
    score: float  # logprob / (len(tokens) + 1) ** lenpen
    logprob: float  # sum of the log-probabilities of the tokens and EOS
    # the model's log-probability of each token, then of EOS (len(tokens) + 1 of them)
    token_logprobs: list[float] = field(default_factory=list)
    text: str | None = None  # the detokenized tokens (set by ``translate_nbest``)


class Prefixes:
    """The target prefixes being extended, one a row, with what the decoder needs for
    them: the encoder output, its padding mask, (with ``use_cache``) the cache, and the
    log-probability of each token after BOS."""

    def __init__(self, model: Transformer | Ensemble, memory: Tensor, src_padding_mask: Tensor,
                 bos_id: int, use_cache: bool):
        self.model, self.memory, self.src_padding_mask = model, memory, src_padding_mask
        self.cache = model.new_cache() if use_cache else None
        self.tokens = memory.new_full((memory.size(0), 1), bos_id, dtype=torch.long)  # (R, 1)
        self.token_lprobs = memory.new_zeros(  # (R, 0), the dtype of ``next_logprobs``
            (memory.size(0), 0), dtype=torch.promote_types(memory.dtype, torch.float32))

    def next_logprobs(self) -> Tensor:
        """Log-probabilities (R, V) of the token after each prefix, at least float32 (a
        bf16 log-softmax would round the scores that beams are ranked by)."""
        # With the cache, only the newest token goes in; without, the whole prefix.
        tokens = self.tokens[:, -1:] if self.cache is not None else self.tokens
        logits = self.model.decode(tokens, self.memory, self.src_padding_mask, self.cache)
        logits = logits[:, -1]  # (R, V)
        return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)

    def advance(self, new_tokens: Tensor, new_lprobs: Tensor, rows: Tensor | None = None,
                sentences_left: bool = False) -> None:
        """Keep the prefixes ``rows`` (R_new,) (all when None), in that order, and append
        ``new_tokens`` (R_new,) of log-probabilities ``new_lprobs`` (R_new,).
        ``sentences_left``: some sentences ended and their rows go; otherwise rows only
        move among the beams of one sentence, whose memory rows are equal and need no copy."""
        kept = self.tokens if rows is None else self.tokens[rows]
        self.tokens = torch.cat([kept, new_tokens[:, None]], dim=1)  # (R_new, t + 1)
        kept = self.token_lprobs if rows is None else self.token_lprobs[rows]
        self.token_lprobs = torch.cat([kept, new_lprobs[:, None].to(kept)], dim=1)  # (R_new, t)
        if rows is not None and self.cache is not None:
            self.cache.reorder(rows, cross_attention=sentences_left)
        if sentences_left:
            self.memory = self.memory.index_select(0, rows)
            self.src_padding_mask = self.src_padding_mask.index_select(0, rows)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) within the block; the previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def max_lengths(model: Transformer | Ensemble, src_tokens: Tensor, max_len_a: float, max_len_b: int,
                pad_id: int) -> Tensor:
    """Tokens each sentence may generate before EOS is forced, (B,) long on the CPU:
    ``int(a * src_len + b)``, capped so that every decoder input has a position."""
    src_lengths = src_tokens.ne(pad_id).sum(1).cpu().double()  # (B,)
    limit = model.max_len - 1  # BOS sits at position 0
    return (max_len_a * src_lengths + max_len_b).long().clamp(0, limit)


def search_rules(model: Transformer | Ensemble, src_tokens: Tensor, max_len_a: float,
                 max_len_b: int, min_len: int, ids: SpecialIds, no_repeat_ngram_size: int,
                 prefix_tokens: list[list[int]] | None) -> tuple[Tensor, Rules]:
    """-> the maximum lengths (B,) (CPU) and the ``Rules`` of a search. A sentence's
    forced prefix is always generated whole: its maximum length is at least the prefix's."""
    max_lens = max_lengths(model, src_tokens, max_len_a, max_len_b, ids.pad)  # (B,)
    rules = Rules(ids, min_len, no_repeat_ngram_size)
    if prefix_tokens is not None:
        if len(prefix_tokens) != src_tokens.size(0):
            raise ValueError(f"{len(prefix_tokens)} prefixes for {src_tokens.size(0)} sources")
        for prefix in prefix_tokens:
            if len(prefix) > model.max_len - 1 or {ids.bos, ids.eos, ids.pad} & set(prefix):
                raise ValueError(f"prefix {prefix}: at most max_len - 1 = {model.max_len - 1} "
                                 "tokens, none of them BOS, EOS or pad")
        rules.prefix_tokens, rules.prefix_lengths = pad_prefixes(prefix_tokens, ids.pad,
                                                                 src_tokens.device)
        max_lens = torch.maximum(max_lens, rules.prefix_lengths.cpu())
    return max_lens, rules


def normalized(logprob: float, n_tokens: int, lenpen: float) -> float:
    """fairseq's length penalty; ``n_tokens`` counts EOS."""
    return logprob / n_tokens**lenpen


def check_arguments(src_tokens: Tensor, beam: int, n_best: int, min_len: int,
                    no_repeat_ngram_size: int = 0) -> None:
    """ConfigError (a ValueError) naming the argument, as evaluate.py's key of that name."""
    if src_tokens.dim() != 2:
        raise ValueError(f"src_tokens must be (B, S), got shape {tuple(src_tokens.shape)}")
    if beam < 1:
        raise ConfigError(f"beam={beam} must be at least 1")
    if not 1 <= n_best <= beam:
        raise ConfigError(f"n_best={n_best} must be in [1, beam={beam}]")
    if min_len < 0:
        raise ConfigError(f"min_len={min_len} must be >= 0")
    if no_repeat_ngram_size < 0:
        raise ConfigError(f"no_repeat_ngram_size={no_repeat_ngram_size} must be >= 0 "
                          "(0: no n-gram is banned)")


@torch.inference_mode()
def greedy_search(model: Transformer | Ensemble, src_tokens: Tensor, max_len_a: float = 1.2,
                  max_len_b: int = 10, min_len: int = 1, bos_id: int = BOS_ID,
                  eos_id: int = EOS_ID, pad_id: int = PAD_ID, use_cache: bool = True,
                  no_repeat_ngram_size: int = 0, prefix_tokens: list[list[int]] | None = None
                  ) -> list[Hypothesis]:
    """The most probable next token at each step, for each of ``src_tokens`` (B, S).

    -> one ``Hypothesis`` a sentence, in input order; its score is the mean
    log-probability per token (EOS included), i.e. lenpen 1. ``prefix_tokens``: for
    each sentence, the tokens its output must start with ([] for none);
    ``no_repeat_ngram_size``: see ``transformer.search_rules``.
    """
    return token_by_token(model, src_tokens, lambda lprobs, sentences, step: lprobs.argmax(-1),
                          max_len_a, max_len_b, min_len, SpecialIds(bos_id, eos_id, pad_id),
                          use_cache, no_repeat_ngram_size, prefix_tokens)


@torch.inference_mode()
def sample_search(model: Transformer | Ensemble, src_tokens: Tensor, sampler: Sampler,
                  sentence_ids: list[int] | None = None, max_len_a: float = 1.2,
                  max_len_b: int = 10, min_len: int = 1, bos_id: int = BOS_ID,
                  eos_id: int = EOS_ID, pad_id: int = PAD_ID, use_cache: bool = True,
                  no_repeat_ngram_size: int = 0, prefix_tokens: list[list[int]] | None = None
                  ) -> list[Hypothesis]:
    """As ``greedy_search``, but each next token is drawn by ``sampler``
    (``transformer.sampling``): sentence i from the random stream of ``sentence_ids[i]``
    (default: i), so that the same seed and ids give the same samples however the
    sentences are batched. Scores are the model's log-probabilities (temperature 1, not
    filtered), as greedy's."""
    sentence_ids = list(range(src_tokens.size(0))) if sentence_ids is None else sentence_ids
    if len(sentence_ids) != src_tokens.size(0):
        raise ValueError(f"{len(sentence_ids)} sentence_ids for {src_tokens.size(0)} sources")
    # A step per position a hypothesis can have, EOS and the longest prefix included.
    n_steps = max(model.max_len, 1 + max(map(len, prefix_tokens or [[]])))
    uniforms = sampler.uniforms(sentence_ids, n_steps).to(src_tokens.device)  # (B, steps)

    def draw(lprobs: Tensor, sentences: Tensor, step: int) -> Tensor:
        return sampler.draw(lprobs, uniforms[sentences.to(uniforms.device), step])

    return token_by_token(model, src_tokens, draw, max_len_a, max_len_b, min_len,
                          SpecialIds(bos_id, eos_id, pad_id), use_cache,
                          no_repeat_ngram_size, prefix_tokens)


def token_by_token(model: Transformer | Ensemble, src_tokens: Tensor,
                   choose: Callable[[Tensor, Tensor, int], Tensor], max_len_a: float,
                   max_len_b: int, min_len: int, ids: SpecialIds, use_cache: bool,
                   no_repeat_ngram_size: int, prefix_tokens: list[list[int]] | None
                   ) -> list[Hypothesis]:
    """Greedy search and sampling: one hypothesis a sentence, extended at each step by the
    token ``choose(lprobs (N, V), sentences (N,) (their batch indices, CPU), step) -> (N,)``
    picks."""
    check_arguments(src_tokens, 1, 1, min_len, no_repeat_ngram_size)
    src_tokens = src_tokens.to(next(model.parameters()).device)
    results: list[Hypothesis] = [None] * src_tokens.size(0)  # type: ignore[list-item]
    with evaluating(model):
        max_lens, rules = search_rules(model, src_tokens, max_len_a, max_len_b, min_len, ids,
                                       no_repeat_ngram_size, prefix_tokens)  # (B,)
        prefixes = Prefixes(model, *model.encode(src_tokens), ids.bos, use_cache)
        sentences = torch.arange(src_tokens.size(0))  # (N,) input index of each row
        logprobs = torch.zeros(src_tokens.size(0), device=src_tokens.device)  # (N,)
        for step in itertools.count():
            lprobs = rules.apply(prefixes.next_logprobs(), step, prefixes.tokens, sentences,
                                 max_lens[sentences] <= step)
            tokens = choose(lprobs, sentences, step)  # (N,)
            token_lprobs = lprobs.gather(1, tokens[:, None])[:, 0]  # (N,)
            logprobs = logprobs + token_lprobs
            ended = tokens.eq(ids.eos).cpu()  # (N,)
            if ended.any():  # the ended rows' tokens and scores reach the host together
                done = ended.nonzero().flatten().to(tokens.device)
                for sentence, row_tokens, logprob, row_lprobs in zip(
                        sentences[ended].tolist(), prefixes.tokens[done, 1:].tolist(),
                        logprobs[done].tolist(), torch.cat(
                            [prefixes.token_lprobs[done], token_lprobs[done, None].to(
                                prefixes.token_lprobs)], dim=1).tolist(), strict=True):
                    results[sentence] = Hypothesis(row_tokens, normalized(logprob, step + 1, 1.0),
                                                   logprob, row_lprobs)
            if ended.all():
                return results
            rows = None
            if ended.any():  # the ended sentences leave the batch
                sentences = sentences[~ended]
                rows = (~ended).nonzero().flatten().to(tokens.device)
                tokens, logprobs, token_lprobs = tokens[rows], logprobs[rows], token_lprobs[rows]
            prefixes.advance(tokens, token_lprobs, rows, sentences_left=rows is not None)
    raise AssertionError("unreachable: EOS is forced at the maximum length")


class Finished:
    """The finished hypotheses of each sentence, and the rule that says when a sentence
    is done (see the module docstring)."""

    def __init__(self, n_sentences: int, beam: int, n_best: int, lenpen: float,
                 early_stopping: bool):
        self.beam, self.n_best, self.lenpen = beam, n_best, lenpen
        self.early_stopping = early_stopping
        self.hypotheses: list[list[Hypothesis]] = [[] for _ in range(n_sentences)]
        # The n_best-th best score of each sentence, -inf until it has n_best.
        self.nth_best = torch.full((n_sentences,), NEG_INF, dtype=torch.float64)
        self.counts = torch.zeros(n_sentences, dtype=torch.long)

    def add(self, sentence: int, hypothesis: Hypothesis) -> None:
        hypotheses = self.hypotheses[sentence]
        if self.early_stopping and len(hypotheses) >= self.beam:
            return  # fairseq keeps the first beam (the best of the step that completes them)
        hypotheses.append(hypothesis)
        self.counts[sentence] += 1
        if len(hypotheses) >= self.n_best:
            scores = sorted((h.score for h in hypotheses), reverse=True)
            self.nth_best[sentence] = scores[self.n_best - 1]

    def done(self, sentences: Tensor, step: int, max_lens: Tensor, best_live: Tensor) -> Tensor:
        """(N,) bool for sentences (N,) after ``step``, given each one's maximum length
        (N,) and best live sum of log-probabilities (N,) (CPU tensors)."""
        at_max_len = max_lens <= step  # EOS was forced: nothing is live any more
        if self.early_stopping:
            return at_max_len | (self.counts[sentences] >= self.beam)
        # Live hypotheses hold step + 1 tokens: they can end with step + 2 to max_len + 1
        # tokens, EOS included, and only lose log-probability on the way.
        best_live = best_live.double()
        bound = torch.maximum(best_live / (step + 2) ** self.lenpen,
                              best_live / (max_lens + 1).double() ** self.lenpen)
        return at_max_len | (self.nth_best[sentences] >= bound)

    def best(self, sentence: int) -> list[Hypothesis]:
        """The n_best hypotheses of ``sentence``, best first."""
        return sorted(self.hypotheses[sentence], key=lambda h: -h.score)[: self.n_best]


@dataclass
class Candidates:
    """Extensions of the live prefixes, each tensor (N, n) for N sentences, best first."""

    scores: Tensor  # sums of log-probabilities
    rows: Tensor  # the prefix row each one extends
    tokens: Tensor  # the token each one appends
    token_lprobs: Tensor  # the log-probability of that token

    def fields(self) -> tuple[Tensor, ...]:
        return self.scores, self.rows, self.tokens, self.token_lprobs

    def take(self, index: Tensor) -> Candidates:
        """The candidates ``index`` (N, m) of each sentence."""
        return Candidates(*(t.gather(1, index) for t in self.fields()))

    def take_sentences(self, index: Tensor) -> Candidates:
        """The candidates of sentences ``index`` (N_new,) only."""
        return Candidates(*(t[index] for t in self.fields()))


def top_candidates(scores: Tensor, lprobs: Tensor) -> Candidates:
    """The best 2k of the k * V extensions of each sentence's k beams: ``scores`` (N, k)
    of the beams, ``lprobs`` (N * k, V) of their next tokens -> (N, 2k)."""
    N, k = scores.shape
    V = lprobs.size(-1)
    totals = (scores[:, :, None] + lprobs.view(N, k, V)).view(N, k * V)  # (N, k * V)
    # 2k: at most k of them (one a beam) end in EOS, so k others can stay live.
    top_scores, index = totals.topk(min(2 * k, k * V), dim=1)  # (N, 2k)
    rows = index // V + torch.arange(N, device=index.device)[:, None] * k
    tokens = index % V
    return Candidates(top_scores, rows, tokens, lprobs[rows, tokens])


def select_live(candidates: Candidates, eos_id: int, k: int) -> Candidates:
    """The best k candidates (N, 2k) -> (N, k) that do not end in EOS."""
    n = candidates.tokens.size(1)
    # Rank the EOS candidates after all the others, each group in its order.
    rank = candidates.tokens.eq(eos_id) * n + torch.arange(n, device=candidates.tokens.device)
    return candidates.take(rank.topk(k, dim=1, largest=False).indices)


def collect_finished(candidates: Candidates, prefixes: Prefixes, sentences: Tensor,
                     step: int, eos_id: int, finished: Finished) -> None:
    """Add to ``finished`` the candidates (N, 2k) ending in EOS among each sentence's best
    k (fairseq: one ranked lower is worse than k live ones, and is dropped)."""
    k = finished.beam
    ended = candidates.tokens[:, :k].eq(eos_id) & candidates.scores[:, :k].isfinite()
    index = ended.nonzero()  # (E, 2): sentence, rank; a sentence's best come first
    if len(index) == 0:
        return
    rows = candidates.rows[index[:, 0], index[:, 1]]  # (E,)
    tokens = prefixes.tokens[rows, 1:].tolist()  # step tokens each, without BOS and EOS
    logprobs = candidates.scores[index[:, 0], index[:, 1]].tolist()
    eos_lprobs = candidates.token_lprobs[index[:, 0], index[:, 1]]  # (E,)
    token_lprobs = torch.cat([prefixes.token_lprobs[rows],
                              eos_lprobs[:, None].to(prefixes.token_lprobs)], dim=1).tolist()
    for sentence, hyp_tokens, logprob, hyp_lprobs in zip(
            sentences[index[:, 0].cpu()].tolist(), tokens, logprobs, token_lprobs, strict=True):
        score = normalized(logprob, step + 1, finished.lenpen)
        finished.add(sentence, Hypothesis(hyp_tokens, score, logprob, hyp_lprobs))


@torch.inference_mode()
def beam_search(model: Transformer | Ensemble, src_tokens: Tensor, beam: int = 5,
                lenpen: float = 0.6, max_len_a: float = 1.2, max_len_b: int = 10, min_len: int = 1,
                bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID,
                use_cache: bool = True, n_best: int = 1, early_stopping: bool = False,
                no_repeat_ngram_size: int = 0, prefix_tokens: list[list[int]] | None = None
                ) -> list[list[Hypothesis]]:
    """Beam search for each of ``src_tokens`` (B, S), batched over sentences and beams.

    -> for each sentence, in input order, its ``n_best`` hypotheses, best score first.
    ``early_stopping``: stop a sentence after ``beam`` finished hypotheses (fairseq)
    instead of once its best ones cannot change (see the module docstring).
    ``prefix_tokens`` and ``no_repeat_ngram_size``: as ``greedy_search``'s.
    """
    check_arguments(src_tokens, beam, n_best, min_len, no_repeat_ngram_size)
    ids = SpecialIds(bos_id, eos_id, pad_id)
    device = next(model.parameters()).device
    src_tokens = src_tokens.to(device)
    finished = Finished(src_tokens.size(0), beam, n_best, lenpen, early_stopping)
    with evaluating(model):
        max_lens, rules = search_rules(model, src_tokens, max_len_a, max_len_b, min_len, ids,
                                       no_repeat_ngram_size, prefix_tokens)  # (B,)
        memory, src_padding_mask = model.encode(src_tokens)
        # Sentence i owns rows i * beam ... (i + 1) * beam - 1 of the prefixes.
        prefixes = Prefixes(model, memory.repeat_interleave(beam, 0),
                            src_padding_mask.repeat_interleave(beam, 0), bos_id, use_cache)
        sentences = torch.arange(src_tokens.size(0))  # (N,) input index of each sentence
        # The beams all start as the same BOS prefix: let only the first one extend it.
        scores = torch.zeros(src_tokens.size(0), beam, device=device)  # (N, k)
        scores[:, 1:] = NEG_INF
        for step in itertools.count():
            force_eos = (max_lens[sentences] <= step).repeat_interleave(beam)
            lprobs = rules.apply(prefixes.next_logprobs(), step, prefixes.tokens,
                                 sentences.repeat_interleave(beam), force_eos)
            candidates = top_candidates(scores, lprobs)  # (N, 2k)
            collect_finished(candidates, prefixes, sentences, step, eos_id, finished)
            live = select_live(candidates, eos_id, beam)  # (N, k)
            done = finished.done(sentences, step, max_lens[sentences],
                                 live.scores.max(dim=1).values.cpu())
            if done.all():
                return [finished.best(i) for i in range(src_tokens.size(0))]
            if done.any():  # the done sentences leave the batch
                sentences = sentences[~done]
                live = live.take_sentences((~done).nonzero().flatten().to(device))
            scores = live.scores
            prefixes.advance(live.tokens.flatten(), live.token_lprobs.flatten(),
                             live.rows.flatten(), sentences_left=bool(done.any()))
    raise AssertionError("unreachable: EOS is forced at the maximum length")
