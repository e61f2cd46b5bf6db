"""Scoring translations: sacreBLEU (cased, detokenized; and lowercased) and chrF, per split,
per pair of user files, or interactively (one translation per stdin line)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, TextIO

import sacrebleu
import torch
from omegaconf import DictConfig, OmegaConf

from transformer.checkpoint import (
    CheckpointError,
    average_checkpoints,
    last_checkpoints,
    load_checkpoint,
    read_checkpoint,
)
from transformer.config import ConfigError, DataConfig, EvalConfig
from transformer.data import DataError, open_corpus, read_lines, read_parallel_lines
from transformer.data.multilingual import (
    directions_name,
    language_tag,
    parse_pairs,
    tag_sources,
    target_tag,
)
from transformer.decoding import Hypothesis
from transformer.ensemble import Ensemble
from transformer.model import Transformer
from transformer.precision import Precision, resolve_device
from transformer.search_options import (
    check_search_options,
    json_lines,
    read_prefixes,
    search_kwargs,
    search_name,
    wants_json,
)
from transformer.translation import translate_nbest

log = logging.getLogger("transformer")


def score(hypotheses: list[str], references: list[str]) -> dict[str, float | str]:
    """Corpus BLEU (13a, cased, detokenized: sacreBLEU's defaults), lowercased BLEU and chrF."""
    bleu, bleu_lc = sacrebleu.BLEU(), sacrebleu.BLEU(lowercase=True)
    chrf = sacrebleu.CHRF()
    return {
        "bleu": bleu.corpus_score(hypotheses, [references]).score,
        "bleu_lc": bleu_lc.corpus_score(hypotheses, [references]).score,
        "chrf": chrf.corpus_score(hypotheses, [references]).score,
        "bleu_signature": str(bleu.get_signature()),
        "bleu_lc_signature": str(bleu_lc.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def evaluate(cfg: EvalConfig | DictConfig, stdin: IO = sys.stdin,
             stdout: TextIO = sys.stdout) -> dict[str, dict]:
    """Load the checkpoint, then translate and score as ``cfg.mode`` says."""
    if cfg.backend != "torch" and cfg.mode != "generate":
        raise ConfigError(f"backend={cfg.backend} needs mode=generate (mode={cfg.mode} "
                          "decodes with backend=torch)")
    if cfg.mode == "generate":  # a file of any size, streamed: transformer/generate.py
        from transformer.generate import generate

        generate(cfg)
        return {}
    device = resolve_device(cfg.device)
    precision = Precision.resolve(cfg.precision, device, training=False).name  # fails early
    check_search_options(cfg)
    model, tokenizer, train_cfg = load_models([cfg.checkpoint, *cfg.ensemble],
                                              cfg.average_last, device, cfg.trust_modules)
    # A multilingual model: the tag of tgt_lang before each source (splits: each its own)
    tag = target_tag(train_cfg.data, cfg.tgt_lang, every_direction=cfg.mode == "splits")

    def run(sentences: list[str], first_line: int = 1,
            prefixes: str | list[str] | None = cfg.prefix) -> list[list[Hypothesis]]:
        """The n-best lists of ``sentences`` (one hypothesis each but with nbest > 1)."""
        if tag is not None:
            sentences = tag_sources(sentences, tag)
        return translate_nbest(model, tokenizer, sentences, lenpen=cfg.lenpen,
                               max_tokens=cfg.batch_tokens, max_len_a=cfg.max_len_a,
                               max_len_b=cfg.max_len_b, min_len=cfg.min_len,
                               precision=precision, first_line=first_line, prefixes=prefixes,
                               **search_kwargs(cfg))

    def to_json(hypotheses: list[list[Hypothesis]], first_id: int = 0) -> list[str]:
        return list(json_lines(hypotheses, tokenizer, cfg.token_scores, first_id))

    if cfg.mode == "interactive":
        interactive(run, stdin, stdout, to_json if wants_json(cfg) else None)
        return {}
    prefixes = {}
    if cfg.mode == "files":
        if not cfg.src_file:
            raise DataError("mode=files needs src_file=PATH (and ref_file=PATH to score)")
        file_name = Path(cfg.src_file).name
        named = {file_name: read_file_pair(cfg.src_file, cfg.ref_file)}
        prefixes[file_name] = read_prefixes(cfg, len(named[file_name][0]))
    elif cfg.mode == "splits":
        named = read_splits(data_config(train_cfg, cfg), list(cfg.splits), cfg.tgt_lang)
    else:
        raise DataError(f"mode={cfg.mode!r} is not one of ['splits', 'files', 'interactive', "
                        "'generate']")
    output_dir = (Path(cfg.output_dir) if cfg.output_dir else
                  default_output_dir(cfg.checkpoint, ensemble=bool(cfg.ensemble)))
    settings = settings_name(cfg, precision)
    scores = {}
    for name, (sources, references) in named.items():
        n_best = run(sources, prefixes=prefixes.get(name, cfg.prefix))
        if wants_json(cfg):
            write_lines(output_dir / f"{name}.{settings}.nbest.jsonl", to_json(n_best))
        scores[name] = translate_and_score(name, [h[0].text or "" for h in n_best], references,
                                           output_dir / f"{name}.{settings}.hyp")
    if cfg.scores_file:
        Path(cfg.scores_file).write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def load_models(checkpoints: list[str], average_last: int, device: torch.device,
                trust_modules: Sequence[str] = ()
                ) -> tuple[Transformer | Ensemble, Any, DictConfig]:
    """-> the model (an ``Ensemble`` of several), the tokenizer and the training config of
    the first. Each of ``checkpoints`` is a file, or with ``average_last`` > 1 a run
    directory whose newest checkpoints are averaged. The members of an ensemble must
    translate the same direction with the same tokenizer. ``trust_modules``: modules
    outside ``transformer`` whose classes the checkpoints' model parts may be."""
    models = []
    for checkpoint in checkpoints:
        state, name = read_state(checkpoint, average_last)
        model, member_tokenizer, member_cfg = load_checkpoint(state, device, name,
                                                              trust_modules)
        if not models:  # the first: the others must match it
            tokenizer, train_cfg, stored_tokenizer, first = (
                member_tokenizer, member_cfg, state["tokenizer"], name)
        else:  # checked as each is read: a mismatch stops before the rest are loaded
            direction = directions_name(train_cfg.data, arrow=True)
            other = directions_name(member_cfg.data, arrow=True)
            if other != direction:
                raise CheckpointError(f"ensemble: {name} translates {other}, {first} "
                                      f"{direction}")
            if state["tokenizer"] != stored_tokenizer:
                raise CheckpointError(f"ensemble: {name} has another tokenizer than {first}; "
                                      "the members must share one")
        models.append(model)
        del state  # its weights are in the model now
    return (models[0] if len(models) == 1 else Ensemble(models)), tokenizer, train_cfg


def read_state(checkpoint: str, average_last: int) -> tuple[dict[str, Any], str]:
    """-> the state of ``checkpoint`` (a file), or with ``average_last`` > 1 the average of
    the newest checkpoints of a run directory, and a name for messages."""
    if average_last > 1:
        paths = last_checkpoints(Path(checkpoint), average_last)
        log.info("averaging %d checkpoints: %s", len(paths), ", ".join(str(p) for p in paths))
        name = f"the average of the newest {len(paths)} checkpoints of {checkpoint}"
        return average_checkpoints(paths), name
    log.info("loading %s", checkpoint)
    return read_checkpoint(checkpoint), checkpoint


def default_output_dir(checkpoint: str, ensemble: bool = False) -> Path:
    """``translations/`` beside the run's checkpoints: in the run directory, whether
    ``checkpoint`` names it, its ``checkpoints/`` folder or a file in that folder;
    ``translations_ensemble/`` for an ensemble led by it."""
    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    return run_dir / ("translations_ensemble" if ensemble else "translations")


def settings_name(cfg: EvalConfig | DictConfig, precision: str) -> str:
    """What sets the translations apart, for their file name, so that evaluations with
    other settings write files of their own: ``beam5.lenpen0.6.checkpoint_best``, or
    ``beam5.lenpen1.4.avg10`` (the run's newest 10, averaged), then ``.ens3`` for an
    ensemble of 3; the length limits and precision only where not the defaults
    (``maxlen1.5x+5``, ``minlen0``, ``bf16``). Other searches and their options name
    themselves in place of ``beam5.lenpen0.6`` (``search_options.search_name``)."""
    defaults = EvalConfig()
    parts = search_name(cfg)  # beam5.lenpen0.6, greedy, sample.topp0.9.seed1, ...
    if (cfg.max_len_a, cfg.max_len_b) != (defaults.max_len_a, defaults.max_len_b):
        parts.append(f"maxlen{cfg.max_len_a:g}x+{cfg.max_len_b}")
    if cfg.min_len != defaults.min_len:
        parts.append(f"minlen{cfg.min_len}")
    if precision != "fp32":  # bf16 and fp16 may change a close choice of the search
        parts.append(precision)
    parts.append(f"avg{cfg.average_last}" if cfg.average_last > 1
                 else Path(cfg.checkpoint).name.removesuffix(".pt"))
    if cfg.ensemble:
        parts.append(f"ens{1 + len(cfg.ensemble)}")
    return ".".join(parts)


def interactive(run, stdin: IO, stdout: TextIO, to_json=None) -> None:
    """One translation per input line, flushed at once: usable in a pipe. Lines are read
    as bytes (``stdin.buffer`` where it has one) and decoded as UTF-8 one at a time: a
    line that is not UTF-8 gets an empty translation and a warning naming it, and the
    lines after it are translated. ``to_json``: the n-best JSON lines of each input line
    instead (``transformer.search_options``)."""
    for number, raw in enumerate(getattr(stdin, "buffer", stdin), start=1):
        line = decoded_line(raw, number)
        n_best = run([line], first_line=number)
        lines = to_json(n_best, first_id=number - 1) if to_json else [n_best[0][0].text or ""]
        stdout.write("".join(text + "\n" for text in lines))
        stdout.flush()


def decoded_line(raw: bytes | str, number: int) -> str:
    """The text of one input line, without its line ending; "" (with a warning) for
    bytes that are not UTF-8."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            log.warning("line %d: bytes that are not UTF-8 (%r): its translation is empty",
                        number, raw[error.start:error.start + 4])
            return ""
    return raw.removesuffix("\n").removesuffix("\r")


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def translate_and_score(name: str, hypotheses: list[str], references: list[str] | None,
                        out_path: Path) -> dict:
    """Write ``hypotheses`` to ``out_path``, and score them against ``references``."""
    write_lines(out_path, hypotheses)
    if references is None:
        print(f"{name}: {len(hypotheses)} translations -> {out_path}")
        return {}
    scores = score(hypotheses, references)
    print(f"{name}: BLEU {scores['bleu']:.2f} | BLEU (lowercased) {scores['bleu_lc']:.2f} | "
          f"chrF {scores['chrf']:.2f} | {len(hypotheses)} sentences -> {out_path}\n"
          f"    {scores['bleu_signature']}\n    {scores['chrf_signature']}")
    return scores


def data_config(train_cfg: DictConfig, cfg: EvalConfig | DictConfig) -> DataConfig:
    data: DataConfig = OmegaConf.to_object(train_cfg.data)
    if cfg.data_root:
        data.root = cfg.data_root
    return data


def read_splits(data: DataConfig, splits: list[str], tgt_lang: str | None = None
                ) -> dict[str, tuple[list[str], list[str]]]:
    """``{split}.{src}-{tgt}`` -> (sources, references) of each split. A multilingual
    config: each direction (only ``tgt_lang``'s if given) that has the split (found, or
    downloaded for Multi30k), its sources tagged; a split no direction has is an error."""
    if not data.pairs:
        return _read_direction_splits(data, open_corpus(data, splits), splits)
    named = {}
    for src, tgt in parse_pairs(data.pairs):
        if tgt_lang not in (None, tgt):
            continue
        direction = replace(data, src_lang=src, tgt_lang=tgt, pairs=[])
        for split in splits:
            try:
                corpus = open_corpus(direction, [split])
            except DataError as error:  # not there (Multi30k has no test_2017_flickr.cs)
                log.info("%s: no %s-%s files, skipped (%s)", split, src, tgt, error)
                continue
            for name, (sources, references) in _read_direction_splits(
                    direction, corpus, [split]).items():
                named[name] = (tag_sources(sources, language_tag(tgt)), references)
    if not named:
        raise DataError(f"none of the splits {splits} found for the directions {data.pairs}")
    return named


def _read_direction_splits(data: DataConfig, corpus: Any, splits: list[str]
                           ) -> dict[str, tuple[list[str], list[str]]]:
    named = {}
    for split in splits:
        sources, references = [], []
        for src_chunk, tgt_chunk in corpus.chunks(split):
            sources += src_chunk
            references += tgt_chunk
        named[f"{split}.{data.src_lang}-{data.tgt_lang}"] = (sources, references)
    return named


def read_file_pair(src_file: str, ref_file: str | None) -> tuple[list[str], list[str] | None]:
    """The lines of ``src_file`` (and ``ref_file``, as many); an empty file is refused
    (sacreBLEU cannot score zero sentences)."""
    sources, references = (read_lines(src_file), None) if ref_file is None else \
        read_parallel_lines(src_file, ref_file)
    if not sources:
        raise DataError(f"{src_file} is empty: no line to translate")
    return sources, references
