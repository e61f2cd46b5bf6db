"""Search options (transformer/sampling.py, transformer/search_rules.py and their use in
transformer/decoding.py) against naive references on tiny random float64 models:
sampling, n-best lists with their scores, forced target prefixes, no_repeat_ngram_size."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_decoding import (
    BOS,
    EOS,
    PAD,
    ScriptedModel,
    random_model,
    random_sources,
    reference_greedy,
    unpadded,
)
from transformer.config import ConfigError
from transformer.decoding import beam_search, greedy_search, sample_search
from transformer.sampling import Sampler
from transformer.search_rules import ban_repeated_ngrams
from transformer.translation import search_ids, translate_nbest


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def teacher_forced(model, src: torch.Tensor, tokens: list[int]) -> list[float]:
    """The model's log-probability of each of ``tokens`` and then EOS, after BOS, for the
    unpadded source ``src`` (S,): one forward pass over the whole hypothesis."""
    target = torch.tensor([[BOS] + tokens])
    lprobs = F.log_softmax(model(src[None], target)[0], dim=-1)  # (T, V)
    return lprobs.gather(1, torch.tensor(tokens + [EOS])[:, None])[:, 0].tolist()


def assert_teacher_forced(model, src_tokens, results) -> None:
    """Each hypothesis's token scores and sum are the model's own (float64 tolerance)."""
    for i, n_best in enumerate(results):
        for hypothesis in n_best:
            expected = teacher_forced(model, unpadded(src_tokens, i), hypothesis.tokens)
            torch.testing.assert_close(hypothesis.token_logprobs, expected)
            torch.testing.assert_close(hypothesis.logprob, math.fsum(expected))


# Sampling

@pytest.mark.parametrize("sampler", [Sampler(top_k=1, seed=5), Sampler(temperature=1e-4, seed=6),
                                     Sampler(top_p=1e-9, seed=7)])
def test_sampling_that_keeps_only_the_best_token_is_greedy(sampler):
    model, src_tokens = random_model(eos_bias=0.5), random_sources([5, 2, 7, 3, 6, 4])
    greedy = greedy_search(model, src_tokens)
    sampled = sample_search(model, src_tokens, sampler)
    assert [h.tokens for h in sampled] == [h.tokens for h in greedy]
    torch.testing.assert_close([h.logprob for h in sampled], [h.logprob for h in greedy])


def naive_filtered(probs: list[float], temperature: float, top_k: int, top_p: float
                   ) -> list[float]:
    """The sampling distribution by hand: temperature, keep the top k, then the fewest
    most probable tokens whose mass reaches top_p, renormalized."""
    weights = [p ** (1 / temperature) for p in probs]
    weights = [w / sum(weights) for w in weights]
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    kept, mass = [], 0.0
    for rank, i in enumerate(order):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        kept.append(i)
        mass += weights[i]
    total = sum(weights[i] for i in kept)
    return [weights[i] / total if i in kept else 0.0 for i in range(len(weights))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.6), (1.0, 0, 0.5),
                                                     (1.0, 0, 0.85), (2.0, 0, 0.7),
                                                     (0.5, 3, 0.99), (1.0, 2, 1.0)])
def test_filtered_distribution_matches_a_hand_computed_one(temperature, top_k, top_p):
    probs = [0.05, 0.5, 0.15, 0.3, 0.0]
    lprobs = torch.tensor([probs], dtype=torch.float64).log()
    got = Sampler(temperature, top_k, top_p).probabilities(lprobs)[0].tolist()
    torch.testing.assert_close(got, naive_filtered(probs, temperature, top_k, top_p))


def one_step_model() -> ScriptedModel:
    """First token 3, 4, 5 or 6 with probabilities 0.5, 0.3, 0.15, 0.05; then EOS."""
    first = {3: 0.5, 4: 0.3, 5: 0.15, 6: 0.05}
    return ScriptedModel(lambda prefix: first if not prefix else {EOS: 1.0}, vocab_size=7,
                         max_positions=4)


def test_top_p_samples_only_the_nucleus_with_its_frequencies():
    # top_p=0.6: the nucleus is {3, 4} (0.5 < 0.6 <= 0.8), renormalized to 0.625 / 0.375.
    n = 2000
    src_tokens = torch.tensor([[5, 6, EOS]]).repeat(n, 1)
    hypotheses = sample_search(one_step_model(), src_tokens, Sampler(top_p=0.6, seed=3),
                               max_len_b=3, use_cache=False)
    first = [h.tokens[0] for h in hypotheses]
    assert set(first) == {3, 4}
    # Binomial standard deviation sqrt(0.625 * 0.375 / 2000) = 0.011: 5 of them.
    assert abs(first.count(3) / n - 0.625) < 0.055
    # The scores stay the model's: log 0.5 or log 0.3 (then EOS, log 1).
    torch.testing.assert_close(sorted({round(h.logprob, 9) for h in hypotheses}),
                               [round(math.log(0.3), 9), round(math.log(0.5), 9)])


def test_same_seed_same_samples_other_seeds_differ():
    model, src_tokens = random_model(eos_bias=-1.0), random_sources([5, 2, 7, 3, 6, 4, 8, 5])
    kwargs = dict(max_len_a=1.5, max_len_b=3)

    def sample(seed):
        return [h.tokens for h in sample_search(model, src_tokens, Sampler(seed=seed), **kwargs)]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    assert sample(3) != [h.tokens for h in greedy_search(model, src_tokens, **kwargs)]


def test_samples_do_not_depend_on_the_batch():
    # Sentence i draws from the stream of its id: alone, in another batch or in another
    # order, it gets the same sample.
    model, src_tokens = random_model(eos_bias=-1.0), random_sources([5, 2, 7, 3, 6, 4], seed=2)
    sampler = Sampler(temperature=1.3, top_p=0.9, seed=11)
    batched = sample_search(model, src_tokens, sampler, max_len_b=6)
    for i, hypothesis in enumerate(batched):
        alone = sample_search(model, unpadded(src_tokens, i)[None], sampler, sentence_ids=[i],
                              max_len_b=6)[0]
        assert alone.tokens == hypothesis.tokens
    src_ids = [unpadded(src_tokens, i).tolist() for i in range(len(src_tokens))]
    one_batch = search_ids(model, src_ids, max_tokens=10_000, sampler=sampler, max_len_b=6)
    many = search_ids(model, src_ids, max_tokens=1, sampler=sampler, max_len_b=6)
    assert [h[0].tokens for h in one_batch] == [h[0].tokens for h in many] == \
        [h.tokens for h in batched]


def test_sampled_scores_are_the_models():
    model, src_tokens = random_model(eos_bias=-0.5), random_sources([5, 2, 7], seed=4)
    hypotheses = sample_search(model, src_tokens, Sampler(temperature=1.5, top_k=4, seed=2))
    assert_teacher_forced(model, src_tokens, [[h] for h in hypotheses])


@pytest.mark.parametrize("kwargs,key", [(dict(top_p=0.0), "top_p="), (dict(top_p=1.5), "top_p="),
                                        (dict(temperature=-1.0), "temperature="),
                                        (dict(temperature=0.0), "temperature="),
                                        (dict(top_k=-2), "top_k=")])
def test_bad_sampling_values_name_their_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        Sampler(**kwargs)


# N-best lists

def test_nbest_lists_beams_best_first_with_the_models_scores():
    model, src_tokens = random_model(eos_bias=0.5), random_sources([5, 2, 7, 3])
    kwargs = dict(beam=4, lenpen=0.6, max_len_b=8)
    best = beam_search(model, src_tokens, **kwargs)
    n_best = beam_search(model, src_tokens, n_best=4, **kwargs)
    for one, many in zip(best, n_best, strict=True):
        assert len(many) == 4 and many[0].tokens == one[0].tokens
        scores = [h.score for h in many]
        assert scores == sorted(scores, reverse=True)
        for h in many:  # the normalized score is the sum over (tokens + EOS) ** lenpen
            torch.testing.assert_close(h.score, h.logprob / (len(h.tokens) + 1) ** 0.6)
    assert_teacher_forced(model, src_tokens, n_best)


def test_nbest_through_search_ids_and_bad_nbest():
    model, src_tokens = random_model(eos_bias=0.5), random_sources([5, 2, 7])
    src_ids = [unpadded(src_tokens, i).tolist() for i in range(3)] + [[EOS]]
    results = search_ids(model, src_ids, beam=3, n_best=3, max_len_b=8)
    direct = beam_search(model, src_tokens, beam=3, n_best=3, max_len_b=8)
    assert [[h.tokens for h in r] for r in results[:3]] == [[h.tokens for h in r] for r in direct]
    assert [h.tokens for h in results[3]] == [[]]  # an empty source: one empty hypothesis
    with pytest.raises(ConfigError, match="nbest=4 must be in"):
        search_ids(model, src_ids, beam=3, n_best=4)
    with pytest.raises(ConfigError, match="nbest=2: sampling"):
        search_ids(model, src_ids, beam=3, n_best=2, sampler=Sampler())


def test_early_stopping_key_reaches_the_beam_search_and_the_file_name():
    """evaluate.py's early_stopping=true is beam_search(early_stopping=True), through
    search_ids (on test_decoding's model where the two rules differ); it names the
    translations file and is refused without beam search."""
    from omegaconf import OmegaConf

    from tests.test_decoding import confident_late_model
    from transformer.config import EvalConfig
    from transformer.search_options import check_search_options, search_kwargs, search_name

    src_ids = [[3, 4, EOS]]
    for early, expected in [(True, [3]), (False, [3] * 19)]:
        cfg = OmegaConf.structured(EvalConfig(beam=2, lenpen=1.0, early_stopping=early))
        kwargs = search_kwargs(cfg)
        nbest, beam = kwargs.pop("nbest"), kwargs.pop("beam")
        results = search_ids(confident_late_model(), src_ids, beam, cfg.lenpen, n_best=nbest,
                             max_len_a=0.0, max_len_b=24, use_cache=False, **kwargs)
        assert results[0][0].tokens == expected
        assert search_name(cfg) == ["beam2", "lenpen1", *(["early"] if early else [])]
    with pytest.raises(ConfigError, match="early_stopping=true needs search=beam"):
        check_search_options(OmegaConf.structured(EvalConfig(search="greedy",
                                                             early_stopping=True)))


# Forced target prefixes

def reference_greedy_with_prefix(model, src, prefix, max_len) -> list[int]:
    """Greedy search, written plainly, whose first tokens are ``prefix``."""
    memory, padding_mask = model.encode(src[None])
    tokens = list(prefix)
    for step in range(len(prefix), max(max_len, len(prefix)) + 1):
        logits = model.decode(torch.tensor([[BOS] + tokens]), memory, padding_mask)[0, -1]
        logits[[PAD, BOS]] = float("-inf")
        token = EOS if step >= max_len else logits.argmax().item()
        if token == EOS:
            return tokens
        tokens.append(token)
    raise AssertionError("unreachable")


PREFIXES = [[7, 8, 9], [], [5], [11, 4, 4, 6, 3, 10, 12, 9, 8, 7, 5, 6]]  # the last: too long


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_prefix_starts_every_output_and_keeps_the_models_scores(search):
    model, src_tokens = random_model(eos_bias=0.5), random_sources([5, 2, 7, 3], seed=5)
    kwargs = dict(max_len_a=1.0, max_len_b=2, prefix_tokens=PREFIXES)
    if search == "greedy":
        results = [[h] for h in greedy_search(model, src_tokens, **kwargs)]
    elif search == "beam":
        results = beam_search(model, src_tokens, beam=3, n_best=3, **kwargs)
    else:
        results = [[h] for h in sample_search(model, src_tokens, Sampler(seed=1), **kwargs)]
    for i, n_best in enumerate(results):
        for hypothesis in n_best:
            assert hypothesis.tokens[: len(PREFIXES[i])] == PREFIXES[i]
        alone = {"prefix_tokens": [PREFIXES[i]], "max_len_a": 1.0, "max_len_b": 2}
        single = unpadded(src_tokens, i)[None]
        if search == "greedy":  # batched with prefixes of other lengths = alone = reference
            assert greedy_search(model, single, **alone)[0].tokens == n_best[0].tokens
            src = unpadded(src_tokens, i)
            assert n_best[0].tokens == reference_greedy_with_prefix(model, src, PREFIXES[i],
                                                                    len(src) + 2)
        elif search == "beam":
            assert [h.tokens for h in beam_search(model, single, beam=3, n_best=3, **alone)[0]] \
                == [h.tokens for h in n_best]
    assert_teacher_forced(model, src_tokens, results)


def test_translate_nbest_with_prefix_text():
    class CharTokenizer:  # a character per token: ids 3 + the letter's index
        def encode_batch(self, texts):
            return [[3 + ord(c) - ord("a") for c in text] for text in texts]

        def decode_batch(self, token_lists):
            return ["".join(chr(ord("a") + t - 3) for t in tokens) for tokens in token_lists]

    model = random_model(eos_bias=0.5)
    outputs = translate_nbest(model, CharTokenizer(), ["abc", "", "dbca"], nbest=2, beam=2,
                              prefixes=["ff", "g", "h"], max_len_b=4)
    assert [len(n_best) for n_best in outputs] == [2, 1, 2]
    assert outputs[1][0].text == ""
    assert all(h.text.startswith("ff") for h in outputs[0])
    assert all(h.text.startswith("h") for h in outputs[2])


# no_repeat_ngram_size

def naive_banned(tokens: list[int], n: int) -> set[int]:
    """The tokens that would complete an n-gram already in ``tokens``."""
    if len(tokens) < n:
        return set()
    tail = tokens[len(tokens) - n + 1:]
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == tail}


def test_ban_repeated_ngrams_matches_the_naive_rule():
    crafted = torch.tensor([[BOS, 5, 6, 5, 6, 5]])
    for n, banned in [(1, {BOS, 5, 6}), (2, {6}), (3, {6}), (4, {6}), (5, set()), (7, set())]:
        lprobs = ban_repeated_ngrams(torch.zeros(1, 13), crafted, n)
        assert set(lprobs[0].isinf().nonzero().flatten().tolist()) == banned, n
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 6, (50, 9), generator=generator)  # 3 values: many repeats
    for n in (1, 2, 3, 4):
        lprobs = ban_repeated_ngrams(torch.zeros(50, 8), tokens, n)
        for row in range(50):
            got = set(lprobs[row].isinf().nonzero().flatten().tolist())
            assert got == naive_banned(tokens[row].tolist(), n)


def repeated_ngrams(tokens: list[int], n: int) -> bool:
    ngrams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(ngrams) != len(set(ngrams))


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_no_repeat_ngram_outputs_repeat_no_ngram(search):
    model = random_model(tgt_vocab=9, eos_bias=-4.0, seed=3)  # long outputs, few tokens
    src_tokens = random_sources([5, 2, 7, 3, 6], seed=6)

    def decode(n):
        kwargs = dict(max_len_a=0.0, max_len_b=14, no_repeat_ngram_size=n)
        if search == "greedy":
            return [h.tokens for h in greedy_search(model, src_tokens, **kwargs)]
        if search == "sample":
            return [h.tokens for h in sample_search(model, src_tokens, Sampler(seed=2),
                                                    **kwargs)]
        return [h.tokens for n_best in beam_search(model, src_tokens, beam=3, n_best=3,
                                                   **kwargs) for h in n_best]

    assert any(repeated_ngrams(tokens, 2) for tokens in decode(0)), "test needs repeats"
    for n in (2, 3):
        assert not any(repeated_ngrams(tokens, n) for tokens in decode(n))


def test_no_repeat_ngram_greedy_matches_reference():
    model, src_tokens = random_model(tgt_vocab=9, eos_bias=-4.0, seed=3), random_sources([4, 6])
    for i, hypothesis in enumerate(greedy_search(model, src_tokens, max_len_a=0.0,
                                                 max_len_b=12, no_repeat_ngram_size=2)):
        memory, padding_mask = model.encode(unpadded(src_tokens, i)[None])
        tokens = []
        for step in range(13):
            logits = model.decode(torch.tensor([[BOS] + tokens]), memory, padding_mask)[0, -1]
            logits[[PAD, BOS]] = float("-inf")
            logits[list(naive_banned([BOS] + tokens, 2))] = float("-inf")
            token = EOS if step == 12 else logits.argmax().item()
            if token == EOS:
                break
            tokens.append(token)
        assert hypothesis.tokens == tokens
    with pytest.raises(ConfigError, match="no_repeat_ngram_size=-1"):
        greedy_search(model, src_tokens, no_repeat_ngram_size=-1)


def test_greedy_reference_still_holds_without_options():
    model, src_tokens = random_model(eos_bias=0.5), random_sources([5, 3])
    for i, hypothesis in enumerate(greedy_search(model, src_tokens, max_len_a=1.0, max_len_b=2)):
        src = unpadded(src_tokens, i)
        assert hypothesis.tokens == reference_greedy(model, src, len(src) + 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_samples_equal_cpu_samples_and_prefixes_hold():
    # The uniforms are drawn on the CPU: a float64 model samples the same on either device.
    model, src_tokens = random_model(eos_bias=-0.5), random_sources([5, 2, 7, 3], seed=7)
    kwargs = dict(max_len_b=6, prefix_tokens=PREFIXES, no_repeat_ngram_size=2)
    sampler = Sampler(temperature=0.9, top_p=0.95, seed=4)
    cpu = sample_search(model, src_tokens, sampler, **kwargs)
    cuda = sample_search(model.cuda(), src_tokens.cuda(), sampler, **kwargs)
    assert [h.tokens for h in cuda] == [h.tokens for h in cpu]
    results = beam_search(model, src_tokens.cuda(), beam=3, n_best=3, **kwargs)
    for i, n_best in enumerate(results):
        assert all(h.tokens[: len(PREFIXES[i])] == PREFIXES[i] for h in n_best)
    assert_teacher_forced(model.cpu(), src_tokens, results)
