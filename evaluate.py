"""Translate and score with a trained checkpoint.

    python evaluate.py checkpoint=outputs/.../checkpoints/checkpoint_best.pt
    python evaluate.py checkpoint=PATH splits=[test_2016_flickr] beam=4 lenpen=0.6
    python evaluate.py checkpoint=PATH mode=files src_file=my.en ref_file=my.de
    echo "A dog runs." | python evaluate.py checkpoint=PATH mode=interactive
    python evaluate.py checkpoint=PATH mode=generate src_file=big.en output_file=big.de  # resumable
    python evaluate.py checkpoint=RUN_A ensemble=[RUN_B,RUN_C] average_last=10  # an ensemble
    python evaluate.py checkpoint=PATH search=sample top_p=0.9 seed=2     # search options:
    python evaluate.py checkpoint=PATH beam=5 nbest=5 token_scores=true   # README "Search options"

Prints sacreBLEU (cased, detokenized, with its signature), lowercased BLEU and chrF per
split, and writes the translations to ``output_dir/<split>.<src>-<tgt>.<settings>.hyp``
(by default ``translations/`` in the checkpoint's run directory; ``<src_file name>`` for
mode=files). ``<settings>`` names what changes the translations, so another evaluation of
the run writes a file of its own: ``beam5.lenpen0.6.checkpoint_best`` (the checkpoint
file's name), ``beam5.lenpen1.4.avg10`` (average_last=10), ``.ens3`` for an ensemble of 3,
and the length limits and precision where they are not the defaults (``maxlen1.5x+5``,
``minlen0``, ``bf16``). A source line longer than the model's max_len is translated from
its first max_len - 1 tokens, with a warning naming the line. Logs go to stderr, so in
interactive mode stdout holds only translations; there a line that is not UTF-8 gets an
empty translation and a warning.
"""

from __future__ import annotations

from omegaconf import DictConfig

from transformer.cli import entry_point
from transformer.config import EvalConfig, register_configs
from transformer.evaluation import evaluate

register_configs()


# A user error prints one line `error: ...` and exits 2: transformer/cli.py.
@entry_point("evaluate", EvalConfig)
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
