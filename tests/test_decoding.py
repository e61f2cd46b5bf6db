"""Greedy and beam search against naive references (one hypothesis at a time, the whole
prefix recomputed, float64), with and without the cache, batched and alone, and on a
tiny model trained here to memorize a few pairs."""

import itertools

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from torch import nn

from transformer import Ensemble, Transformer
from transformer.decoding import Hypothesis, beam_search, greedy_search
from transformer.translation import translate, translate_ids

PAD, BOS, EOS = 0, 1, 2
SRC_VOCAB, TGT_VOCAB = 19, 13


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: a second thread costs more in start-up and contention
    (tens of times more on a busy 2-core machine) than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(tgt_vocab: int = TGT_VOCAB, eos_bias: float = 0.0,
                 pad_bos_bias: float = 0.0, seed: int = 0, d_model: int = 16,
                 max_len: int = 1024) -> Transformer:
    """A random float64 model; the biases are added to the logits of EOS, and of PAD and
    BOS (through a bias on the output projection)."""
    torch.manual_seed(seed)
    model = Transformer(SRC_VOCAB, tgt_vocab, d_model=d_model, n_heads=2, n_encoder_layers=2,
                        n_decoder_layers=2, d_ff=32, dropout=0.0,
                        max_len=max_len).double().eval()
    projection = nn.Linear(d_model, tgt_vocab).double()
    with torch.no_grad():
        projection.weight.copy_(model.output_projection.weight)
        projection.bias.zero_()
        projection.bias[EOS] = eos_bias
        projection.bias[[PAD, BOS]] = pad_bos_bias
    model.output_projection = projection
    return model


def random_sources(lengths: list[int], seed: int = 1) -> torch.Tensor:
    """(B, max(lengths) + 1) right-padded sources, each ``lengths[i]`` tokens + EOS."""
    generator = torch.Generator().manual_seed(seed)
    src_tokens = torch.full((len(lengths), max(lengths) + 1), PAD)
    for i, n in enumerate(lengths):
        src_tokens[i, :n] = torch.randint(4, SRC_VOCAB, (n,), generator=generator)
        src_tokens[i, n] = EOS
    return src_tokens


def reference_beam_search(model, src_tokens, beam, lenpen, max_len, min_len=1, n_best=1,
                          early_stopping=False) -> list[Hypothesis]:
    """fairseq's beam search for one sentence, written plainly: lists of hypotheses,
    each prefix decoded whole. Without early_stopping it runs to the maximum length."""
    memory, padding_mask = model.encode(src_tokens[None])
    live, finished = [([], 0.0)], []
    for step in range(max_len + 1):
        candidates = []
        for tokens, logprob in live:
            logits = model.decode(torch.tensor([[BOS] + tokens]), memory, padding_mask)
            lprobs = F.log_softmax(logits[0, -1], dim=-1).tolist()
            for token, token_lprob in enumerate(lprobs):
                allowed = (token == EOS) if step == max_len else (
                    token not in (PAD, BOS) and (token != EOS or step >= min_len))
                if allowed and token_lprob > float("-inf"):
                    candidates.append((logprob + token_lprob, tokens, token))
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beam]
        for logprob, tokens, token in candidates[:beam]:
            if token == EOS and not (early_stopping and len(finished) >= beam):
                score = logprob / (len(tokens) + 1) ** lenpen
                finished.append(Hypothesis(tokens, score, logprob))
        live = [(tokens + [token], logprob) for logprob, tokens, token in candidates
                if token != EOS][:beam]
        if early_stopping and len(finished) >= beam:
            break
    return sorted(finished, key=lambda h: -h.score)[:n_best]


def reference_greedy(model, src_tokens, max_len, min_len=1) -> list[int]:
    memory, padding_mask = model.encode(src_tokens[None])
    tokens = []
    for step in range(max_len + 1):
        logits = model.decode(torch.tensor([[BOS] + tokens]), memory, padding_mask)[0, -1]
        logits[[PAD, BOS]] = float("-inf")
        if step < min_len:
            logits[EOS] = float("-inf")
        token = EOS if step == max_len else logits.argmax().item()
        if token == EOS:
            return tokens
        tokens.append(token)
    raise AssertionError("unreachable")


def assert_same(hypotheses: list[Hypothesis], expected: list[Hypothesis]) -> None:
    assert [h.tokens for h in hypotheses] == [h.tokens for h in expected]
    torch.testing.assert_close([h.score for h in hypotheses], [h.score for h in expected])
    torch.testing.assert_close([h.logprob for h in hypotheses],
                               [h.logprob for h in expected])


def unpadded(src_tokens: torch.Tensor, i: int) -> torch.Tensor:
    return src_tokens[i, : int(src_tokens[i].ne(PAD).sum())]


@pytest.mark.parametrize("early_stopping", [True, False])
@pytest.mark.parametrize("lenpen", [0.0, 1.0])
def test_beam_search_matches_reference(early_stopping, lenpen):
    model, src_tokens = random_model(eos_bias=1.0), random_sources([5, 2, 7, 3])
    results = beam_search(model, src_tokens, beam=3, lenpen=lenpen, max_len_a=0.0,
                          max_len_b=7, min_len=2, n_best=3, early_stopping=early_stopping)
    for i, hypotheses in enumerate(results):
        expected = reference_beam_search(model, unpadded(src_tokens, i), 3, lenpen, 7, 2, 3,
                                         early_stopping)
        assert_same(hypotheses, expected)


def test_exact_stopping_never_scores_below_early_stopping():
    model, src_tokens = random_model(eos_bias=1.0), random_sources([4, 6, 3, 8], seed=2)
    early = beam_search(model, src_tokens, beam=3, lenpen=1.0, max_len_b=12,
                        early_stopping=True)
    exact = beam_search(model, src_tokens, beam=3, lenpen=1.0, max_len_b=12)
    # The two searches drop finished sentences from the batch at different steps, so the
    # same hypothesis is scored through differently shaped float64 products: its score may
    # differ in the last bits (-2.2e-16 seen on an AVX2 CPU with one thread).
    assert all(x[0].score >= e[0].score - 1e-12 for x, e in zip(exact, early, strict=True))


def test_greedy_matches_reference():
    model, src_tokens = random_model(eos_bias=0.5), random_sources([5, 2, 7, 3])
    for min_len in (0, 3):
        hypotheses = greedy_search(model, src_tokens, max_len_a=1.0, max_len_b=2,
                                   min_len=min_len)
        for i, hypothesis in enumerate(hypotheses):
            src = unpadded(src_tokens, i)
            assert hypothesis.tokens == reference_greedy(model, src, len(src) + 2, min_len)


class ScriptedModel(nn.Module):
    """A stand-in for ``Transformer`` whose next-token probabilities are a function of
    the prefix, written by hand (decode only without the cache)."""

    def __init__(self, next_probs, vocab_size: int, max_positions: int = 1024):
        super().__init__()
        self.next_probs, self.vocab_size = next_probs, vocab_size
        self.device_marker = nn.Parameter(torch.zeros(1))
        self.max_len = max_positions

    def encode(self, src_tokens):
        return torch.zeros(*src_tokens.shape, 1), src_tokens.eq(PAD)

    def decode(self, tgt_tokens, memory, src_padding_mask, cache=None):
        assert cache is None
        logits = torch.zeros(*tgt_tokens.shape, self.vocab_size, dtype=torch.float64)
        for row, prefix in enumerate(tgt_tokens[:, 1:].tolist()):
            probs = torch.zeros(self.vocab_size, dtype=torch.float64)
            for token, p in self.next_probs(prefix).items():
                probs[token] = p
            logits[row, -1] = probs.log()
        return logits


def confident_late_model() -> ScriptedModel:
    """"a" then EOS is likely and ends early; "a a ..." is unlikely at its second token,
    then near certain, and ends after 19 tokens; "b" is unlikely and often ends."""
    a, b = 3, 4

    def next_probs(prefix: list[int]) -> dict[int, float]:
        if not prefix:
            return {a: 0.9, b: 0.1}
        if prefix == [a]:
            return {EOS: 0.85, a: 0.1, b: 0.05}
        if set(prefix) == {a}:
            return {EOS: 0.999, a: 0.001} if len(prefix) >= 19 else {a: 0.999, EOS: 0.001}
        return {EOS: 0.6, a: 0.2, b: 0.2}

    return ScriptedModel(next_probs, vocab_size=5)


def test_exact_stopping_waits_for_a_better_late_hypothesis():
    # After step 1, "a EOS" scores -0.135 (lenpen 1) and the live "a a" has -2.41: it can
    # still win, by growing long at little cost (-2.43 / 20 = -0.12). A bound that assumes
    # the shortest length (-2.41 / 3) would stop here; fairseq's rule stops once "a b EOS"
    # makes beam=2 finished hypotheses.
    model, src_tokens = confident_late_model(), torch.tensor([[3, 4, EOS]])
    kwargs = dict(beam=2, lenpen=1.0, max_len_a=0.0, max_len_b=24, use_cache=False)
    exact = beam_search(model, src_tokens, **kwargs)[0]
    assert exact[0].tokens == [3] * 19
    assert_same(exact, reference_beam_search(model, src_tokens[0], 2, 1.0, 24))
    fairseq = beam_search(model, src_tokens, early_stopping=True, **kwargs)[0]
    assert fairseq[0].tokens == [3]
    assert_same(fairseq, reference_beam_search(model, src_tokens[0], 2, 1.0, 24,
                                               early_stopping=True))


@pytest.mark.parametrize("early_stopping,lenpen", [(False, 0.0), (True, 0.0), (True, 0.6),
                                                   (True, 2.0)])
def test_beam_one_is_greedy(early_stopping, lenpen):
    # (Exact stopping with lenpen > 0 may find a better-scored longer hypothesis.)
    model, src_tokens = random_model(eos_bias=0.5), random_sources([5, 2, 7, 3, 9, 1])
    greedy = greedy_search(model, src_tokens)
    beam = beam_search(model, src_tokens, beam=1, lenpen=lenpen, early_stopping=early_stopping)
    assert [h[0].tokens for h in beam] == [h.tokens for h in greedy]
    torch.testing.assert_close([h[0].logprob for h in beam], [h.logprob for h in greedy])


@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search_same_with_and_without_cache(early_stopping):
    model, src_tokens = random_model(eos_bias=0.5), random_sources([6, 3, 8, 1])
    kwargs = dict(beam=4, lenpen=0.6, n_best=4, early_stopping=early_stopping)
    cached = beam_search(model, src_tokens, **kwargs)
    recomputed = beam_search(model, src_tokens, use_cache=False, **kwargs)
    for hypotheses, expected in zip(cached, recomputed, strict=True):
        assert_same(hypotheses, expected)


def test_greedy_same_with_and_without_cache():
    model, src_tokens = random_model(eos_bias=0.5), random_sources([6, 3, 8, 1])
    for hypothesis, expected in zip(greedy_search(model, src_tokens),
                                    greedy_search(model, src_tokens, use_cache=False),
                                    strict=True):
        assert_same([hypothesis], [expected])


@pytest.mark.parametrize("search", ["greedy", "beam", "beam_fairseq"])
def test_batched_equals_alone(search):
    # Sentences of different lengths end at different steps and leave the batch; each
    # must decode as it would alone (padding and batch neighbours change nothing).
    model, src_tokens = random_model(eos_bias=0.5), random_sources([2, 9, 4, 6, 1, 7], seed=3)

    def decode(src):
        if search == "greedy":
            return [[h] for h in greedy_search(model, src, max_len_a=1.5, max_len_b=1)]
        return beam_search(model, src, beam=3, n_best=2, lenpen=1.0, max_len_a=1.5, max_len_b=1,
                           early_stopping=search == "beam_fairseq")

    batched = decode(src_tokens)
    lengths = {len(h[0].tokens) for h in batched}
    assert len(lengths) > 1, "test needs outputs of different lengths"
    for i, hypotheses in enumerate(batched):
        assert_same(hypotheses, decode(unpadded(src_tokens, i)[None])[0])


def test_min_and_max_length():
    model = random_model(eos_bias=3.0)  # EOS at once unless min_len forbids it
    src_tokens = random_sources([3, 8, 5, 12], seed=4)
    src_lengths = src_tokens.ne(PAD).sum(1).tolist()
    assert all(len(h[0].tokens) <= 1 for h in beam_search(model, src_tokens, min_len=0))
    for min_len in (1, 4):
        for hypotheses in beam_search(model, src_tokens, beam=3, n_best=3, min_len=min_len):
            assert all(len(h.tokens) >= min_len for h in hypotheses)
        assert all(len(h.tokens) >= min_len for h in greedy_search(model, src_tokens,
                                                                  min_len=min_len))
    # EOS is forced after int(a * src_len + b) tokens, per sentence; max wins over min.
    kwargs = dict(max_len_a=0.5, max_len_b=1, min_len=100)
    for src_len, hypotheses in zip(src_lengths, beam_search(model, src_tokens, n_best=2,
                                                            **kwargs), strict=True):
        assert [len(h.tokens) for h in hypotheses] == [int(0.5 * src_len + 1)] * 2
    for src_len, hypothesis in zip(src_lengths, greedy_search(model, src_tokens, **kwargs),
                                   strict=True):
        assert len(hypothesis.tokens) == int(0.5 * src_len + 1)


def test_never_emits_pad_or_bos():
    model, src_tokens = random_model(pad_bos_bias=5.0), random_sources([3, 8, 5], seed=4)
    token_lists = [h.tokens for n_best in beam_search(model, src_tokens, beam=3, n_best=3)
                   for h in n_best] + [h.tokens for h in greedy_search(model, src_tokens)]
    assert all(PAD not in tokens and BOS not in tokens for tokens in token_lists)


def test_longer_length_penalty_never_shortens():
    # The finished hypotheses do not depend on lenpen (the beams are ranked by sums of
    # log-probabilities), and a larger exponent favours longer ones among them.
    model = random_model(tgt_vocab=8)
    src_tokens = random_sources([3, 8, 5, 12, 6, 4, 9, 2], seed=5)
    lengths = []
    for lenpen in (0.0, 0.5, 1.0, 2.0):
        results = beam_search(model, src_tokens, beam=4, lenpen=lenpen)
        lengths.append([len(h[0].tokens) for h in results])
    for shorter, longer in itertools.pairwise(lengths):
        assert all(a <= b for a, b in zip(shorter, longer, strict=True))
    assert sum(lengths[-1]) > sum(lengths[0]), "test needs lenpen to change something"


def test_memorized_pairs_are_reproduced():
    # A tiny model overfits 8 pairs (target: a fixed token mapping of the reversed
    # source); beam search must give back every reference: BLEU 100.
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    mapping = torch.randperm(SRC_VOCAB, generator=generator) % (TGT_VOCAB - 4) + 4
    lengths = [4, 7, 5, 9, 3, 6, 8, 5]
    src_tokens = random_sources(lengths, seed=6)
    targets = [mapping[unpadded(src_tokens, i)[:-1].flip(0)].tolist()
               for i in range(len(lengths))]
    tgt_in = torch.full((len(lengths), max(lengths) + 1), PAD)
    tgt_out = torch.full_like(tgt_in, PAD)
    for i, target in enumerate(targets):
        tgt_in[i, : len(target) + 1] = torch.tensor([BOS] + target)
        tgt_out[i, : len(target) + 1] = torch.tensor(target + [EOS])
    model = Transformer(SRC_VOCAB, TGT_VOCAB, d_model=64, n_heads=4, n_encoder_layers=2,
                        n_decoder_layers=2, d_ff=128, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = F.cross_entropy(model(src_tokens, tgt_in).flatten(0, 1), tgt_out.flatten(),
                               ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.training, "the searches must restore the model's mode"
    results = beam_search(model, src_tokens, beam=4, lenpen=0.6)
    assert model.training
    assert [h[0].tokens for h in results] == targets
    hypotheses = [" ".join(map(str, h[0].tokens)) for h in results]
    references = [" ".join(map(str, target)) for target in targets]
    assert sacrebleu.corpus_bleu(hypotheses, [references]).score == pytest.approx(100.0)


class WordTokenizer:
    """``"w5 w7"`` <-> ``[5, 7]``; refuses empty sentences (translate must skip them)."""

    def encode_batch(self, sentences: list[str]) -> list[list[int]]:
        assert all(s.strip() for s in sentences), "empty sentence sent to the tokenizer"
        return [[int(word[1:]) for word in s.split()] for s in sentences]

    def decode_batch(self, token_lists: list[list[int]]) -> list[str]:
        return [" ".join(f"w{t}" for t in tokens) for tokens in token_lists]


@pytest.mark.parametrize("beam", [1, 3])
def test_translate_keeps_order_and_empty_lines(beam):
    model = random_model(eos_bias=1.0)
    src_tokens = random_sources([5, 1, 9, 3, 7, 2], seed=7)
    sentences = [" ".join(f"w{t}" for t in unpadded(src_tokens, i)[:-1].tolist())
                 for i in range(len(src_tokens))]
    sentences[2:2] = [""]
    sentences.append("  ")
    kwargs = dict(beam=beam, lenpen=0.6, max_len_b=5)
    # max_tokens=12: several batches, sorted by length; the output is in input order.
    outputs = translate(model, WordTokenizer(), sentences, max_tokens=12, **kwargs)
    assert outputs == translate(model, WordTokenizer(), sentences, **kwargs)
    expected = [translate(model, WordTokenizer(), [s], **kwargs)[0] for s in sentences]
    assert outputs == expected
    assert outputs[2] == "" and outputs[-1] == ""
    assert sum(o != "" for o in outputs) == 6
    assert translate(model, WordTokenizer(), ["", ""]) == ["", ""]
    assert translate(model, WordTokenizer(), []) == []


def test_translate_cuts_a_source_longer_than_max_len(caplog):
    """A source of more than max_len tokens (EOS included) is translated from its first
    max_len - 1 tokens, with a warning naming its line; the other lines are untouched.
    It used to raise a ValueError from the positional encoding, losing every line."""
    model = random_model(eos_bias=1.0, max_len=16)
    words = [f"w{4 + i % 15}" for i in range(40)]
    sentences = ["w5 w6", " ".join(words), "", " ".join(words[:15]), "w7 w8 w9"]
    kwargs = dict(beam=2, max_len_b=5)
    with caplog.at_level("WARNING", logger="transformer.decoding"):
        outputs = translate(model, WordTokenizer(), sentences, first_line=10, **kwargs)
    assert len(outputs) == 5 and outputs[2] == ""
    # The long line as if the user had cut it to 15 words; 15 words + EOS fit exactly.
    expected = [translate(model, WordTokenizer(), [s], **kwargs)[0] if s else ""
                for s in [sentences[0], " ".join(words[:15]), "", *sentences[3:]]]
    assert outputs == expected
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("line 11: 41 source tokens")
    assert "max_len=16" in warnings[0]


def test_translate_ids_keeps_order_and_empty_sources():
    model = random_model(eos_bias=1.0)
    src_tokens = random_sources([5, 1, 9, 3, 7, 2], seed=8)
    src_ids = [unpadded(src_tokens, i).tolist() for i in range(len(src_tokens))]
    src_ids[1:1] = [[EOS], []]
    outputs = translate_ids(model, src_ids, beam=3, max_tokens=12, max_len_b=5)
    assert outputs[1:3] == [[], []]
    for ids, output in zip(src_ids, outputs, strict=True):
        if len(ids) > 1:
            expected = beam_search(model, torch.tensor([ids]), beam=3, max_len_b=5)[0][0]
            assert output == expected.tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_and_bf16_translate():
    model = random_model(eos_bias=1.0).cuda()
    src_tokens = random_sources([6, 3, 8, 1]).cuda()
    cached = beam_search(model, src_tokens, beam=4, n_best=2)
    for hypotheses, expected in zip(cached, beam_search(model, src_tokens.cpu(), beam=4,
                                                        n_best=2, use_cache=False),
                                    strict=True):
        assert [h.tokens for h in hypotheses] == [h.tokens for h in expected]
    outputs = translate(model.float(), WordTokenizer(), ["w5 w6 w7", "", "w8"])
    assert outputs[1] == "" and all(isinstance(o, str) for o in outputs)


class NaiveEnsemble:
    """The reference ensemble: every member decodes the whole prefix from its own encoder
    output, and the probabilities (not log-probabilities) are averaged, in float64."""

    def __init__(self, models):
        self.models = models

    def encode(self, src_tokens):
        encoded = [model.encode(src_tokens) for model in self.models]
        return [memory for memory, _ in encoded], encoded[0][1]

    def decode(self, tokens, memories, padding_mask):
        probs = [F.softmax(model.decode(tokens, memory, padding_mask), dim=-1)
                 for model, memory in zip(self.models, memories, strict=True)]
        return torch.stack(probs).mean(dim=0).log()


def two_different_models():
    """Two random models of different widths that disagree (other seeds, other EOS bias)."""
    return [random_model(eos_bias=1.0), random_model(eos_bias=0.3, seed=1, d_model=24)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_ensemble_beam_search_matches_reference(use_cache):
    models, src_tokens = two_different_models(), random_sources([5, 2, 7, 3])
    results = beam_search(Ensemble(models), src_tokens, beam=3, lenpen=1.0, max_len_a=0.0,
                          max_len_b=7, min_len=2, n_best=3, use_cache=use_cache)
    for i, hypotheses in enumerate(results):
        expected = reference_beam_search(NaiveEnsemble(models), unpadded(src_tokens, i), 3,
                                         1.0, 7, 2, 3)
        assert_same(hypotheses, expected)
    # Not what either member alone would say (else the test could not tell).
    alone = [beam_search(model, src_tokens, beam=3, lenpen=1.0, max_len_a=0.0,
                         max_len_b=7, min_len=2) for model in models]
    assert all([h[0].tokens for h in results] != [h[0].tokens for h in a] for a in alone)


def test_ensemble_greedy_matches_reference():
    models, src_tokens = two_different_models(), random_sources([5, 2, 7, 3], seed=3)
    results = greedy_search(Ensemble(models), src_tokens, max_len_a=0.0, max_len_b=9)
    for i, hypothesis in enumerate(results):
        expected = reference_greedy(NaiveEnsemble(models), unpadded(src_tokens, i), 9)
        assert hypothesis.tokens == expected


def test_ensemble_of_one_model_is_that_model():
    model, src_tokens = random_model(eos_bias=1.0), random_sources([4, 6, 3, 8], seed=2)
    for one, alone in zip(beam_search(Ensemble([model]), src_tokens, beam=4, n_best=2),
                          beam_search(model, src_tokens, beam=4, n_best=2), strict=True):
        assert_same(one, alone)


def test_ensemble_refuses_different_target_vocabularies():
    with pytest.raises(ValueError, match="vocabularies differ"):
        Ensemble([random_model(), random_model(tgt_vocab=TGT_VOCAB + 1)])
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])
