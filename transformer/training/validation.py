"""Validation: teacher-forced loss and perplexity, BLEU of greedy (or beam) translations,
examples and attention maps; the best checkpoint and early stopping follow from it."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import sacrebleu
import torch
from sacrebleu.metrics import BLEU

from transformer.data import EncodedSplit, TokenBatchSampler, collate
from transformer.data.multilingual import direction_indices, tag_ids
from transformer.decoding import evaluating
from transformer.distributed import sum_over_ranks
from transformer.fsdp import full_parameters
from transformer.model import keep_attention_weights
from transformer.tokenizer import EOS_ID
from transformer.training.state import save
from transformer.training.step import batch_loss
from transformer.translation import translate_ids

if TYPE_CHECKING:
    from transformer.training.run import Run

log = logging.getLogger("transformer")


def validate_and_save(run: Run) -> None:
    """Validate, keep the best checkpoint, count validations without improvement, save.
    Every rank gets the same metrics (validate sums over ranks), so all stop together."""
    metrics = validate(run)
    state, key = run.state, run.cfg.trainer.best_metric
    value = metrics[f"val/{key}"]
    improved = state.best is None or (value > state.best if key == "bleu" else value < state.best)
    if improved:
        state.best, state.validations_without_improvement = value, 0
    else:
        state.validations_without_improvement += 1
    log.info("step %d | %s%s", state.step,
             " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), " (best)" if improved else "")
    save(run, best=improved)


@torch.inference_mode()
def validate(run: Run) -> dict[str, float]:
    """val/loss and val/ppl teacher-forced over the whole val split; val/bleu from greedy
    (or trainer.val_beam) translations; examples and attention maps to TensorBoard. Under
    DDP each rank takes every world_size-th batch and sentence on the bare model; the sums
    (loss, tokens, BLEU's n-gram counts) are added over ranks: the whole split's metrics."""
    with evaluating(run.model), full_parameters(run.train_module):  # FSDP: gathered whole
        return validation_metrics(run, run.data.splits[run.cfg.data.valid_split])


def validation_metrics(run: Run, split: EncodedSplit) -> dict[str, float]:
    model, cfg, ddp = run.model, run.cfg, run.ddp
    loss = nll = 0.0
    tokens = 0
    sampler = TokenBatchSampler.for_split(split, cfg.data.max_tokens, shuffle=False)
    for indices in sampler.batches(0)[ddp.rank::ddp.world_size]:
        batch = collate(split, indices).to(run.device)
        with run.precision.autocast():
            batch_loss_sum, batch_nll = batch_loss(model, batch, cfg.trainer.label_smoothing)
        loss, nll, tokens = loss + batch_loss_sum, nll + batch_nll, tokens + batch.n_tgt_tokens
    sums = sum_over_ranks(torch.tensor([float(loss), float(nll), tokens], dtype=torch.float64,
                                       device=run.device), ddp).tolist()
    nll_per_token = sums[1] / sums[2]
    metrics = {"val/loss": sums[0] / sums[2], "val/nll_loss": nll_per_token,
               "val/ppl": math.exp(min(nll_per_token, 50.0))}
    metrics.update(validation_bleu(run, split))
    run.logger.scalars(metrics, run.state.step)
    if cfg.logger.attention_maps and ddp.is_main:
        log_attention_maps(run, split)
    return metrics


def validation_bleu(run: Run, split: EncodedSplit) -> dict[str, float]:
    """val/bleu: corpus BLEU of the first val_max_sentences. A multilingual run
    (``data.pairs``) scores each direction's first val_max_sentences apart, as
    val/bleu/en-fr, ..., and val/bleu is their mean."""
    n = run.cfg.trainer.val_max_sentences or len(split.src_ids)
    if not run.cfg.data.pairs:
        return {"val/bleu": direction_bleu(run, split, range(min(n, len(split.src_ids))))}
    tags = tag_ids(run.cfg.data.pairs, run.data.src_tokenizer)
    groups = direction_indices([ids[0] if len(ids) else -1 for ids in split.src_ids], tags)
    scores = {f"val/bleu/{name}": direction_bleu(run, split, indices[:n], f"{name}_")
              for name, indices in groups.items() if indices}
    return {"val/bleu": sum(scores.values()) / max(len(scores), 1), **scores}


def direction_bleu(run: Run, split: EncodedSplit, indices: Sequence[int],
                   example_prefix: str = "") -> float:
    """Corpus BLEU of the pairs ``indices`` of ``split``, lowercased when the tokenizer
    lowercases (``data.lowercase``); under DDP each rank translates every world_size-th
    sentence and the n-gram statistics are summed over ranks."""
    mine = indices[run.ddp.rank::run.ddp.world_size]
    src_ids = [split.src_ids[i] + [EOS_ID] for i in mine]
    hypotheses = []
    if src_ids:  # a rank can be left without sentences when there are fewer than ranks
        with run.precision.autocast():
            hypotheses = translate_ids(run.model, src_ids, beam=run.cfg.trainer.val_beam,
                                       max_tokens=run.cfg.data.max_tokens)
        hypotheses = run.data.tgt_tokenizer.decode_batch(hypotheses)
    references = [split.tgt_text[i] for i in mine]
    for example, i in enumerate(mine[:run.cfg.logger.n_examples]):
        run.logger.text(f"val/{example_prefix}example_{example}",
                        f"**source:** {split.src_text[i]}  \n"
                        f"**reference:** {references[example]}  \n"
                        f"**hypothesis:** {hypotheses[example]}", run.state.step)
    stats = bleu_statistics(hypotheses, references, lowercase=run.cfg.data.lowercase)
    stats = sum_over_ranks(torch.tensor(stats, dtype=torch.float64, device=run.device),
                           run.ddp).long().tolist()
    return BLEU.compute_bleu(correct=stats[0:4], total=stats[4:8], sys_len=stats[8],
                             ref_len=stats[9], smooth_method="exp").score


def bleu_statistics(hypotheses: list[str], references: list[str], lowercase: bool = False
                    ) -> list[int]:
    """BLEU's sufficient statistics, which add up over parts of a corpus: matching and total
    n-grams for n = 1..4, hypothesis and reference lengths (sacrebleu's defaults)."""
    if not hypotheses:
        return [0] * 10
    score = sacrebleu.corpus_bleu(hypotheses, [references], lowercase=lowercase)
    return [*score.counts, *score.totals, score.sys_len, score.ref_len]


def log_attention_maps(run: Run, split: EncodedSplit) -> None:
    """Head 0 of the last layer's encoder self-, decoder self- and cross-attention for the
    first val sentence, teacher-forced on its reference."""
    batch = collate(split, [0]).to(run.device)
    src_labels = run.data.src_tokenizer.id_tokens(batch.src_tokens[0].tolist())
    tgt_labels = run.data.tgt_tokenizer.id_tokens(batch.tgt_input[0].tolist())
    with keep_attention_weights(run.model) as modules:
        run.model(batch.src_tokens, batch.tgt_input)
        last_enc, last_dec = len(run.model.encoder.layers) - 1, len(run.model.decoder.layers) - 1
        maps = {
            "encoder_self": (modules[f"encoder.layers.{last_enc}.self_attn"], src_labels,
                             src_labels),
            "decoder_self": (modules[f"decoder.layers.{last_dec}.self_attn"], tgt_labels,
                             tgt_labels),
            "cross": (modules[f"decoder.layers.{last_dec}.cross_attn"], src_labels, tgt_labels),
        }
        layers = {"encoder_self": (last_enc, len(run.model.encoder.layers))}
        layers["decoder_self"] = layers["cross"] = (last_dec, len(run.model.decoder.layers))
        for name, (module, keys, queries) in maps.items():
            layer, n_layers = layers[name]
            title = f"{name.replace('_', ' ')} attention, layer {layer + 1} of {n_layers}, head 1"
            run.logger.attention_map(f"attention/{name}", module.last_weights[0, 0], keys,
                                     queries, run.state.step, title=title)
