"""Greedy and beam search over the decoder's incremental cache (the seed's step 4).

``greedy_search(model, src_tokens (B, S)) -> [Hypothesis] * B`` and
``beam_search(model, src_tokens (B, S)) -> [[Hypothesis] * n_best] * B`` decode a batch of
right-padded sources. The encoder runs once; each step feeds the decoder only the newest
token and reuses the keys/values of earlier positions from a ``DecoderCache``
(``use_cache=False`` recomputes the whole prefix instead: same results, used by the tests).
``translate`` wraps them for lists of sentences: tokenize, batch by tokens, detokenize.
Each takes a ``Transformer`` or an ``Ensemble`` of them (``transformer.ensemble``).

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.ensemble import Ensemble
from transformer.model import Transformer
from transformer.precision import Precision
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID

NEG_INF = float("-inf")
log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    """One finished translation."""

    tokens: list[int]  # without BOS and EOS
    score: float  # logprob / (len(tokens) + 1) ** lenpen
    logprob: float  # sum of the log-probabilities of the tokens and EOS


@dataclass
class SpecialIds:
    """The ids the search treats specially (the defaults: ``transformer.tokenizer``'s)."""

    bos: int = BOS_ID
    eos: int = EOS_ID
    pad: int = PAD_ID


class Prefixes:
    """The target prefixes being extended, one a row, with what the decoder needs for
    them: the encoder output, its padding mask and (with ``use_cache``) the cache."""

    def __init__(self, model: Transformer | Ensemble, memory: Tensor, src_padding_mask: Tensor,
                 bos_id: int, use_cache: bool):
        self.model, self.memory, self.src_padding_mask = model, memory, src_padding_mask
        self.cache = model.new_cache() if use_cache else None
        self.tokens = memory.new_full((memory.size(0), 1), bos_id, dtype=torch.long)  # (R, 1)

    def next_logprobs(self) -> Tensor:
        """Log-probabilities (R, V) of the token after each prefix, at least float32 (a
        bf16 log-softmax would round the scores that beams are ranked by)."""
        # With the cache, only the newest token goes in; without, the whole prefix.
        tokens = self.tokens[:, -1:] if self.cache is not None else self.tokens
        logits = self.model.decode(tokens, self.memory, self.src_padding_mask, self.cache)
        logits = logits[:, -1]  # (R, V)
        return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)

    def advance(self, new_tokens: Tensor, rows: Tensor | None = None,
                sentences_left: bool = False) -> None:
        """Keep the prefixes ``rows`` (R_new,) (all when None), in that order, and append
        ``new_tokens`` (R_new,). ``sentences_left``: some sentences ended and their rows
        go; otherwise rows only move among the beams of one sentence, whose memory rows
        are equal and need no copy."""
        kept = self.tokens if rows is None else self.tokens[rows]
        self.tokens = torch.cat([kept, new_tokens[:, None]], dim=1)  # (R_new, t + 1)
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


def constrain(lprobs: Tensor, step: int, min_len: int, force_eos: Tensor,
              ids: SpecialIds) -> Tensor:
    """Set to -inf, in place, the tokens that may not come next in ``lprobs`` (R, V):
    pad and BOS always, EOS before ``min_len``; rows where ``force_eos`` (R,) (CPU bool,
    the maximum length is reached) may take only EOS, with the model's probability."""
    eos_lprobs = lprobs[:, ids.eos].clone()  # (R,)
    lprobs[:, ids.pad] = NEG_INF
    lprobs[:, ids.bos] = NEG_INF
    if step < min_len:
        lprobs[:, ids.eos] = NEG_INF
    if force_eos.any():
        forced = force_eos.to(lprobs.device)
        lprobs.masked_fill_(forced[:, None], NEG_INF)
        lprobs[:, ids.eos] = torch.where(forced, eos_lprobs, lprobs[:, ids.eos])
    return lprobs


def normalized(logprob: float, n_tokens: int, lenpen: float) -> float:
    """fairseq's length penalty; ``n_tokens`` counts EOS."""
    return logprob / n_tokens**lenpen


def check_arguments(src_tokens: Tensor, beam: int, n_best: int, min_len: int) -> None:
    if src_tokens.dim() != 2:
        raise ValueError(f"src_tokens must be (B, S), got shape {tuple(src_tokens.shape)}")
    if beam < 1:
        raise ValueError(f"beam={beam} must be at least 1")
    if not 1 <= n_best <= beam:
        raise ValueError(f"n_best={n_best} must be in [1, beam={beam}]")
    if min_len < 0:
        raise ValueError(f"min_len={min_len} must be >= 0")


@torch.inference_mode()
def greedy_search(model: Transformer | Ensemble, src_tokens: Tensor, max_len_a: float = 1.2,
                  max_len_b: int = 10, min_len: int = 1, bos_id: int = BOS_ID,
                  eos_id: int = EOS_ID, pad_id: int = PAD_ID, use_cache: bool = True
                  ) -> list[Hypothesis]:
    """The most probable next token at each step, for each of ``src_tokens`` (B, S).

    -> one ``Hypothesis`` a sentence, in input order; its score is the mean
    log-probability per token (EOS included), i.e. lenpen 1.
    """
    check_arguments(src_tokens, 1, 1, min_len)
    ids = SpecialIds(bos_id, eos_id, pad_id)
    src_tokens = src_tokens.to(next(model.parameters()).device)
    results: list[Hypothesis] = [None] * src_tokens.size(0)  # type: ignore[list-item]
    with evaluating(model):
        max_lens = max_lengths(model, src_tokens, max_len_a, max_len_b, pad_id)  # (B,)
        prefixes = Prefixes(model, *model.encode(src_tokens), bos_id, use_cache)
        sentences = torch.arange(src_tokens.size(0))  # (N,) input index of each row
        logprobs = torch.zeros(src_tokens.size(0), device=src_tokens.device)  # (N,)
        for step in itertools.count():
            lprobs = constrain(prefixes.next_logprobs(), step, min_len,
                               max_lens[sentences] <= step, ids)
            best, tokens = lprobs.max(dim=-1)  # (N,)
            logprobs = logprobs + best
            ended = tokens.eq(eos_id).cpu()  # (N,)
            if ended.any():  # the ended rows' tokens and scores reach the host together
                done = ended.nonzero().flatten().to(tokens.device)
                for sentence, row_tokens, logprob in zip(
                        sentences[ended].tolist(), prefixes.tokens[done, 1:].tolist(),
                        logprobs[done].tolist(), strict=True):
                    results[sentence] = Hypothesis(
                        row_tokens, normalized(logprob, step + 1, 1.0), logprob)
            if ended.all():
                return results
            rows = None
            if ended.any():  # the ended sentences leave the batch
                sentences = sentences[~ended]
                rows = (~ended).nonzero().flatten().to(tokens.device)
                tokens, logprobs = tokens[rows], logprobs[rows]
            prefixes.advance(tokens, rows, sentences_left=rows is not None)
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

    def take(self, index: Tensor) -> Candidates:
        """The candidates ``index`` (N, m) of each sentence."""
        return Candidates(*(t.gather(1, index) for t in (self.scores, self.rows, self.tokens)))

    def take_sentences(self, index: Tensor) -> Candidates:
        """The candidates of sentences ``index`` (N_new,) only."""
        return Candidates(self.scores[index], self.rows[index], self.tokens[index])


def top_candidates(scores: Tensor, lprobs: Tensor) -> Candidates:
    """The best 2k of the k * V extensions of each sentence's k beams: ``scores`` (N, k)
    of the beams, ``lprobs`` (N * k, V) of their next tokens -> (N, 2k)."""
    N, k = scores.shape
    V = lprobs.size(-1)
    totals = (scores[:, :, None] + lprobs.view(N, k, V)).view(N, k * V)  # (N, k * V)
    # 2k: at most k of them (one a beam) end in EOS, so k others can stay live.
    top_scores, index = totals.topk(min(2 * k, k * V), dim=1)  # (N, 2k)
    rows = index // V + torch.arange(N, device=index.device)[:, None] * k
    return Candidates(top_scores, rows, index % V)


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
    for sentence, hyp_tokens, logprob in zip(sentences[index[:, 0].cpu()].tolist(), tokens,
                                             logprobs, strict=True):
        score = normalized(logprob, step + 1, finished.lenpen)
        finished.add(sentence, Hypothesis(hyp_tokens, score, logprob))


@torch.inference_mode()
def beam_search(model: Transformer | Ensemble, src_tokens: Tensor, beam: int = 5,
                lenpen: float = 0.6, max_len_a: float = 1.2, max_len_b: int = 10, min_len: int = 1,
                bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID,
                use_cache: bool = True, n_best: int = 1, early_stopping: bool = False
                ) -> list[list[Hypothesis]]:
    """Beam search for each of ``src_tokens`` (B, S), batched over sentences and beams.

    -> for each sentence, in input order, its ``n_best`` hypotheses, best score first.
    ``early_stopping``: stop a sentence after ``beam`` finished hypotheses (fairseq)
    instead of once its best ones cannot change (see the module docstring).
    """
    check_arguments(src_tokens, beam, n_best, min_len)
    ids = SpecialIds(bos_id, eos_id, pad_id)
    device = next(model.parameters()).device
    src_tokens = src_tokens.to(device)
    finished = Finished(src_tokens.size(0), beam, n_best, lenpen, early_stopping)
    with evaluating(model):
        max_lens = max_lengths(model, src_tokens, max_len_a, max_len_b, pad_id)  # (B,)
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
            lprobs = constrain(prefixes.next_logprobs(), step, min_len, force_eos, ids)
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
            prefixes.advance(live.tokens.flatten(), live.rows.flatten(),
                             sentences_left=bool(done.any()))
    raise AssertionError("unreachable: EOS is forced at the maximum length")


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


def best_hypotheses(model: Transformer | Ensemble, src_tokens: Tensor, beam: int, lenpen: float,
                    **search_kwargs: Any) -> list[Hypothesis]:
    """The best hypothesis of each of ``src_tokens`` (B, S): beam search, greedy at beam 1."""
    if beam == 1:
        return greedy_search(model, src_tokens, **search_kwargs)
    return [n_best[0] for n_best in beam_search(model, src_tokens, beam=beam, lenpen=lenpen,
                                                **search_kwargs)]


@torch.inference_mode()
def translate_ids(model: Transformer | Ensemble, src_ids: list[list[int]], beam: int = 5,
                  lenpen: float = 0.6, max_tokens: int = 8192,
                  on_batch: Callable[[int], None] | None = None,
                  **search_kwargs: Any) -> list[list[int]]:
    """Token ids in (each ``tokens + [EOS]``), the best hypothesis's tokens out (without
    BOS and EOS), in order. Sorted by length and batched by ``max_tokens`` padded source
    tokens; a source with no token before EOS gives [] without running the model. Runs on
    the model's device, in the caller's precision (autocast stays the caller's choice).
    ``on_batch(n)``: called after each batch of n sentences (a progress bar)."""
    eos_id, pad_id = search_kwargs.get("eos_id", EOS_ID), search_kwargs.get("pad_id", PAD_ID)
    device = next(model.parameters()).device
    todo = [i for i, ids in enumerate(src_ids) if ids and ids != [eos_id]]
    outputs: list[list[int]] = [[] for _ in src_ids]
    for batch in token_batches([len(src_ids[i]) for i in todo], max_tokens):
        indices = [todo[j] for j in batch]
        src_tokens = pad_batch([src_ids[i] for i in indices], pad_id, device)
        hypotheses = best_hypotheses(model, src_tokens, beam, lenpen, **search_kwargs)
        for i, hypothesis in zip(indices, hypotheses, strict=True):
            outputs[i] = hypothesis.tokens
        if on_batch is not None:
            on_batch(len(indices))
    return outputs


def translate(model: Transformer | Ensemble, tokenizer: TextTokenizer, sentences: list[str],
              beam: int = 5, lenpen: float = 0.6, max_tokens: int = 8192,
              device: torch.device | str | None = None, precision: str = "auto",
              first_line: int = 1, on_batch: Callable[[int], None] | None = None,
              **search_kwargs: Any) -> list[str]:
    """Translate ``sentences``, in order: tokenize (+ EOS), ``translate_ids`` (beam 1:
    greedy), detokenize. Empty sentences give "" without reaching the tokenizer or the
    model. A sentence longer than the model's ``max_len`` tokens (EOS included) is cut to
    its first ``max_len - 1`` tokens + EOS, with a warning naming its line (``first_line``:
    the line number of ``sentences[0]``). ``device``: where to run (the model moves there);
    None: the model's device. ``precision``: the autocast dtype, as ``trainer.precision``
    (auto: bf16 on CUDA, fp32 on the CPU). ``on_batch(n)``: called after each batch of n
    sentences. ``search_kwargs`` go to the search
    (max_len_a, max_len_b, min_len, bos_id, eos_id, pad_id, ...)."""
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    outputs = [""] * len(sentences)
    todo = [i for i, sentence in enumerate(sentences) if sentence.strip()]
    if not todo:
        return outputs
    eos_id = search_kwargs.get("eos_id", EOS_ID)
    src_ids = [ids + [eos_id] for ids in tokenizer.encode_batch([sentences[i] for i in todo])]
    src_ids = [truncated(ids, model.max_len, eos_id, first_line + i)
               for i, ids in zip(todo, src_ids, strict=True)]
    with Precision.resolve(precision, device, training=False).autocast():
        hypotheses = translate_ids(model, src_ids, beam, lenpen, max_tokens,
                                   on_batch=on_batch, **search_kwargs)
    for i, text in zip(todo, tokenizer.decode_batch(hypotheses), strict=True):
        outputs[i] = text
    return outputs


def truncated(src_ids: list[int], max_len: int, eos_id: int, line: int) -> list[int]:
    """``src_ids`` (tokens + EOS) cut to ``max_len`` ids, EOS kept last: the encoder has
    no position beyond ``max_len``. One long line of a file is translated in part, with a
    warning, rather than ending the run (Hugging Face's tokenizers truncate likewise)."""
    if len(src_ids) <= max_len:
        return src_ids
    log.warning("line %d: %d source tokens (EOS included), more than the model's max_len=%d: "
                "translating its first %d tokens only", line, len(src_ids), max_len, max_len - 1)
    return src_ids[: max_len - 1] + [eos_id]
