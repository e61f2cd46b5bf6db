"""Importing OPUS-MT (Marian) models: a tiny random ``MarianMTModel`` with a SentencePiece
model trained here (no network), converted, must give Hugging Face's logits, greedy and
beam search outputs and texts."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from transformer.checkpoint import (  # noqa: E402
    load_checkpoint,
    read_checkpoint,
    read_tokenizers,
    save_checkpoint,
)
from transformer.config import DataConfig, EvalConfig, register_configs  # noqa: E402
from transformer.data import prepare_data  # noqa: E402
from transformer.decoding import beam_search, greedy_search  # noqa: E402
from transformer.evaluation import evaluate  # noqa: E402
from transformer.marian import MarianConversionError, convert_marian  # noqa: E402
from transformer.positional import sinusoids  # noqa: E402
from transformer.trainer import train  # noqa: E402
from transformer.translation import translate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "dog", "cat", "runs", "sleeps", "on", "under", "big", "small", "red",
         "green", "house", "tree", "man", "woman", "child", "plays", "with", "ball", "near",
         "water", "street", "walks", "sits", "looks", "at"]
SOURCES = ["the dog runs", "a small red cat sleeps under the big green tree",
           "a man walks", "the child plays with a ball near the water on the street"]


def train_spm(vocab_size: int, seed: int) -> bytes:
    """A SentencePiece model trained on random sentences of WORDS."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(500)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                   vocab_size=vocab_size, model_type="unigram", minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return train_spm(48, seed=0)


def marian_directory(path: Path, spm_model: bytes, shared: bool, tied: bool = True,
                     target_spm: bytes | None = None, **options) -> Path:
    """Save a random MarianMTModel and its MarianTokenizer, as OPUS-MT's look, in ``path``;
    the vocabulary is ``spm_model``'s pieces, ``target_spm`` (default: the same) splits
    target-language text."""
    path.mkdir()
    (path / "source.spm").write_bytes(spm_model)
    (path / "target.spm").write_bytes(target_spm or spm_model)
    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    # Marian's layout: </s> 0, <unk> 1, the pieces, <pad> last.
    vocab = ["</s>", "<unk>"] + [p for p in pieces if p not in ("<unk>", "<s>", "</s>")]
    vocab.append("<pad>")
    (path / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(vocab)}))
    tokenizer = transformers.MarianTokenizer(str(path / "source.spm"), str(path / "target.spm"),
                                             str(path / "vocab.json"))
    tokenizer.save_pretrained(path)
    pad = len(vocab) - 1
    config = transformers.MarianConfig(
        vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=16, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        activation_function="swish", scale_embedding=True, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=0, dropout=0.1,
        share_encoder_decoder_embeddings=shared, tie_word_embeddings=tied, **options)
    torch.manual_seed(1)
    model = transformers.MarianMTModel(config)
    # Larger random weights than Hugging Face's init (std 0.02, near-uniform logits): the
    # searches then pick clear winners, and some end before the maximum length.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed_positions" in name or "layer_norm" in name:
                continue
            if "embed_tokens" in name or "shared" in name:  # <pad>'s row too: not zero
                parameter.normal_(0.0, 1.0)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
            else:
                parameter.normal_(0.0, 2.0 / parameter.size(1) ** 0.5)
        model.final_logits_bias.normal_(0.0, 0.5)
        model.final_logits_bias[0, 0] += 4.0  # </s> likely: some searches end on their own
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[(True, True), (False, True), (False, False)],
                ids=["shared", "separate", "separate-untied"])
def converted(request, spm_model, tmp_path_factory):
    """(Hugging Face model, its tokenizer, our checkpoint path) for one embedding layout."""
    shared, tied = request.param
    directory = marian_directory(tmp_path_factory.mktemp("marian") / "opus-mt", spm_model,
                                 shared, tied)
    checkpoint = directory.parent / "converted.pt"
    save_checkpoint(convert_marian(directory), checkpoint)
    hf_model = transformers.MarianMTModel.from_pretrained(directory).eval()
    return hf_model, transformers.MarianTokenizer.from_pretrained(directory), checkpoint


def marian_ids(hf_model) -> torch.Tensor:
    """Marian's id of each of ours: [pad, start, eos, unk, the others in order]."""
    config = hf_model.config
    specials = [config.pad_token_id, config.decoder_start_token_id, 0, 1]
    return torch.tensor(specials + [i for i in range(config.vocab_size)
                                    if i not in (config.pad_token_id, 0, 1)])


def test_tokenizer_gives_marians_ids_and_texts(converted):
    hf_model, hf_tokenizer, checkpoint = converted
    _, tokenizer, _ = load_checkpoint(checkpoint)
    to_marian = marian_ids(hf_model)
    for text in SOURCES + ["zebra xylophone", ">>deu<< the dog"]:
        ours = tokenizer.encode(text) + [tokenizer.eos_id]
        assert to_marian[ours].tolist() == hf_tokenizer(text).input_ids
        assert tokenizer.decode(ours) == hf_tokenizer.decode(hf_tokenizer(text).input_ids,
                                                             skip_special_tokens=True)


def test_logits_match_hugging_face(converted):
    hf_model, hf_tokenizer, checkpoint = converted
    model, tokenizer, _ = load_checkpoint(checkpoint)
    batch = hf_tokenizer(SOURCES, text_target=SOURCES[::-1], padding=True, return_tensors="pt")
    decoder_input = hf_model.prepare_decoder_input_ids_from_labels(batch["labels"])
    with torch.no_grad():
        expected = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            decoder_input_ids=decoder_input).logits
    to_marian = marian_ids(hf_model)
    to_ours = torch.empty_like(to_marian)
    to_ours[to_marian.flip(0)] = torch.arange(len(to_marian)).flip(0)  # pad -> 0, not 1
    src = to_ours[batch["input_ids"]]
    tgt = to_ours[decoder_input]
    tgt[:, 0] = tokenizer.bos_id
    with torch.no_grad():
        logits = model(src, tgt)
    keep = torch.arange(len(to_marian)) != tokenizer.bos_id  # our <s> is never predicted
    torch.testing.assert_close(logits[..., keep], expected[..., to_marian[keep]],
                               atol=1e-4, rtol=1e-4)
    assert (logits[..., tokenizer.bos_id] < -1e3).all()


@pytest.mark.parametrize("beam, lenpen", [(1, 1.0), (3, 1.0), (4, 0.6)])
def test_search_matches_generate(converted, beam, lenpen):
    """Same settings on both sides: Hugging Face's max_length counts its start token and
    forces </s> as the last one; its early_stopping=True is ours. One difference: a forced
    </s> scores 0 there and its log-probability here (fairseq's), so beam search results
    are compared where Hugging Face's best hypothesis ended on its own."""
    hf_model, hf_tokenizer, checkpoint = converted
    model, tokenizer, _ = load_checkpoint(checkpoint)
    pad = hf_model.config.pad_token_id
    batch = hf_tokenizer(SOURCES, padding=True, return_tensors="pt")
    max_length = 30
    expected = hf_model.generate(
        **batch, num_beams=beam, length_penalty=lenpen, early_stopping=True, do_sample=False,
        max_length=max_length, min_length=0, bad_words_ids=[[pad]], forced_eos_token_id=0)
    expected_texts = hf_tokenizer.batch_decode(expected, skip_special_tokens=True)
    expected_ids = [[t for t in row[1:] if t != pad] for row in expected.tolist()]
    compared = [i for i, ids in enumerate(expected_ids)
                if beam == 1 or len(ids) < max_length - 1]  # ended on its own
    kwargs = dict(max_len_a=0.0, max_len_b=max_length - 2, min_len=0)
    if beam > 1:
        kwargs["early_stopping"] = True
    texts = translate(model, tokenizer, SOURCES, beam=beam, lenpen=lenpen, **kwargs)
    assert [texts[i] for i in compared] == [expected_texts[i] for i in compared]
    src_tokens = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(tokenizer.encode(text) + [tokenizer.eos_id]) for text in SOURCES],
        batch_first=True, padding_value=tokenizer.pad_id)
    if beam == 1:
        hypotheses = greedy_search(model, src_tokens, **kwargs)
    else:
        hypotheses = [n_best[0] for n_best in beam_search(
            model, src_tokens, beam=beam, lenpen=lenpen, **kwargs)]
    to_marian = marian_ids(hf_model)
    for i in compared:
        assert to_marian[hypotheses[i].tokens + [tokenizer.eos_id]].tolist() == expected_ids[i]


@pytest.mark.parametrize("d_model", [16, 15])
def test_concatenated_sinusoids_are_marians(d_model):
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    expected = MarianSinusoidalPositionalEmbedding(40, d_model).create_weight()
    torch.testing.assert_close(sinusoids(40, d_model, concat=True), expected)


def test_not_a_marian_directory(tmp_path):
    with pytest.raises(MarianConversionError, match="no config.json"):
        convert_marian(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(MarianConversionError, match="not a Marian model.*bart"):
        convert_marian(tmp_path)


@pytest.mark.parametrize("options, named", [
    (dict(normalize_before=True), "normalize_before=True"),
    (dict(add_final_layer_norm=True), "add_final_layer_norm=True"),
    (dict(activation_function="gelu_new"), "activation_function='gelu_new'"),
    (dict(layernorm_embedding=True), "layernorm_embedding=True"),
    (dict(decoder_ffn_dim=64), "decoder_ffn_dim=64"),
])
def test_unsupported_options_are_named(tmp_path, spm_model, options, named):
    directory = marian_directory(tmp_path / "opus-mt", spm_model, shared=True)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **options}))
    with pytest.raises(MarianConversionError, match="unsupported Marian options: .*" + named):
        convert_marian(directory)


def test_script_writes_a_checkpoint_that_translates(tmp_path, spm_model):
    directory = marian_directory(tmp_path / "opus-mt", spm_model, shared=True)
    output = tmp_path / "converted.pt"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_marian.py"),
                    "--input", str(directory), "--output", str(output)], check=True)
    model, tokenizer, cfg = load_checkpoint(output)
    assert cfg.model.positional.kind == "sinusoidal_concat" and cfg.model.scale_embedding
    (tmp_path / "src.en").write_text("\n".join(SOURCES) + "\n")
    scores = evaluate(EvalConfig(checkpoint=str(output), mode="files", beam=2,
                                 src_file=str(tmp_path / "src.en"),
                                 ref_file=str(tmp_path / "src.en"), output_dir=str(tmp_path)))
    (hyp_path,) = tmp_path.glob("src.en.*.hyp")  # the settings are in its name
    hypotheses = hyp_path.read_text().splitlines()
    assert hypotheses == translate(model, tokenizer, SOURCES, beam=2, lenpen=0.6)
    assert set(scores["src.en"]) >= {"bleu", "chrf"}


def test_script_reports_errors(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_marian.py"),
                             "--input", str(tmp_path), "--output", str(tmp_path / "out.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no config.json" in result.stderr


# ------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def fine_tuning(tmp_path_factory):
    """(Hugging Face tokenizer, converted checkpoint, corpus folder) of a Marian model whose
    target language has a SentencePiece model of its own, and a toy parallel corpus."""
    root = tmp_path_factory.mktemp("fine_tune")
    directory = marian_directory(root / "opus-mt", train_spm(48, seed=0), shared=False,
                                 target_spm=train_spm(40, seed=1))
    checkpoint = root / "converted.pt"
    save_checkpoint(convert_marian(directory), checkpoint)
    rng = random.Random(2)
    corpus = root / "corpus"
    corpus.mkdir()
    for split, n in [("train", 64), ("valid", 8)]:
        sources = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(n)]
        (corpus / f"{split}.en").write_text("".join(f"{s}\n" for s in sources))
        (corpus / f"{split}.de").write_text("".join(f"{' '.join(s.split()[::-1])}\n"
                                                    for s in sources))
    return transformers.MarianTokenizer.from_pretrained(directory), checkpoint, corpus


def fine_tune_config(corpus: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[
            "data=parallel_files", f"data.root={corpus}", "data.test_splits=[]",
            "data.max_len=60", "data.max_tokens=256", f"data.cache_dir={corpus.parent / 'cache'}",
            "trainer.device=cpu", "trainer.val_every_steps=null", "trainer.log_every_steps=1",
            "trainer.val_max_sentences=4", "logger.tensorboard=false", *overrides])


def test_data_path_encodes_each_side_as_hugging_face(fine_tuning):
    hf_tokenizer, checkpoint, corpus = fine_tuning
    state = read_checkpoint(checkpoint)
    cfg = DataConfig(source="parallel_files", root=str(corpus), valid_split="valid",
                     test_splits=[], max_len=60, cache_dir=str(corpus.parent / "cache"))
    data = prepare_data(cfg, ["train"], log=lambda _: None,
                        given_tokenizers=read_tokenizers(state["tokenizer"]))
    split = data.splits["train"]
    to_marian = torch.tensor(
        [hf_tokenizer.pad_token_id, hf_tokenizer.pad_token_id, 0, 1]
        + [i for i in range(len(hf_tokenizer)) if i not in (hf_tokenizer.pad_token_id, 0, 1)])
    for i in range(len(split)):
        encoded = hf_tokenizer(split.src_text[i], text_target=split.tgt_text[i])
        assert to_marian[list(split.src_ids[i]) + [2]].tolist() == encoded.input_ids
        assert to_marian[list(split.tgt_ids[i]) + [2]].tolist() == encoded.labels
    # The target SentencePiece model splits differently: the check above tells them apart.
    assert any(hf_tokenizer(text).input_ids != hf_tokenizer(text_target=text).input_ids
               for text in split.tgt_text)


def test_train_resume_from_converted_starts_at_its_weights(fine_tuning, tmp_path):
    _, checkpoint, corpus = fine_tuning
    train(fine_tune_config(corpus, [f"trainer.resume={checkpoint}", "trainer.max_steps=0"]),
          tmp_path)
    saved = read_checkpoint(tmp_path / "checkpoints" / "checkpoint_last.pt")
    converted = read_checkpoint(checkpoint)
    assert saved["step"] == 0 and saved["tokenizer"] == converted["tokenizer"]
    assert saved["config"]["model"] == converted["config"]["model"]
    for name, tensor in converted["model"].items():
        assert torch.equal(saved["model"][name], tensor), name
    model, tokenizer, _ = load_checkpoint(tmp_path / "checkpoints" / "checkpoint_last.pt")
    reference, reference_tokenizer, _ = load_checkpoint(checkpoint)
    assert translate(model, tokenizer, SOURCES, beam=2) == \
        translate(reference, reference_tokenizer, SOURCES, beam=2)


def test_fine_tuning_a_converted_model_learns_and_resumes(fine_tuning, tmp_path):
    _, checkpoint, corpus = fine_tuning
    overrides = [f"trainer.init_from={checkpoint}", "optim.lr=1e-2", "sched.warmup_steps=1",
                 "model.dropout=0.0", "trainer.save_every_steps=5"]
    train(fine_tune_config(corpus, [*overrides, "trainer.max_steps=5"]), tmp_path)
    first = read_checkpoint(tmp_path / "checkpoints" / "checkpoint_last.pt")
    assert first["config"]["model"]["dropout"] == 0.0  # this run's regularisation ...
    assert first["config"]["model"]["positional"]["kind"] == "sinusoidal_concat"  # Marian's
    train(fine_tune_config(corpus, [*overrides, "trainer.max_steps=30", "trainer.resume=auto"]),
          tmp_path)
    last = read_checkpoint(tmp_path / "checkpoints" / "checkpoint_last.pt")
    assert last["step"] == 30 and "optimizer" in last
    model, tokenizer, _ = load_checkpoint(tmp_path / "checkpoints" / "checkpoint_last.pt")
    start, _, _ = load_checkpoint(checkpoint)
    data = prepare_data(DataConfig(source="parallel_files", root=str(corpus),
                                   valid_split="valid", test_splits=[], max_len=60,
                                   cache_dir=str(corpus.parent / "cache")),
                        ["train"], log=lambda _: None,
                        given_tokenizers=read_tokenizers(last["tokenizer"]))
    assert nll(model, data.splits["train"]) < 0.5 * nll(start, data.splits["train"])


def nll(model, split) -> float:
    """Mean token negative log-likelihood of the first 16 pairs."""
    from transformer.data import collate

    batch = collate(split, list(range(16)))
    with torch.no_grad():
        logits = model(batch.src_tokens, batch.tgt_input)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.tgt_output,
                                             ignore_index=0).item()


def run_converter(directory: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_marian.py"),
                           "--input", str(directory), "--output", str(output)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_script_refuses_corrupt_weights_in_one_line(tmp_path, spm_model, damage):
    directory = marian_directory(tmp_path / "opus-mt", spm_model, shared=True)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    if damage == "garbage":  # the library call; the script's exit is shown once, below
        with pytest.raises(MarianConversionError, match="model.safetensors is truncated"):
            convert_marian(directory)
        return
    result = run_converter(directory, tmp_path / "out.pt")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "model.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("key, change", [("vocab_size", +7), ("vocab_size", -5),
                                         ("decoder_vocab_size", +3)])
def test_a_vocab_size_the_weights_do_not_have_is_refused(tmp_path, spm_model, key, change):
    """Each used to end in a traceback (an IndexError, or load_state_dict's size
    mismatch); the script prints MarianConversionError as one ``error:`` line."""
    directory = marian_directory(tmp_path / "opus-mt", spm_model, shared=False)
    config = json.loads((directory / "config.json").read_text())
    config[key] += change
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(MarianConversionError, match=f"config.json has {key}={config[key]}, "
                                                    "but the weights' .* has"):
        convert_marian(directory)
