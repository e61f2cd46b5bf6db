"""Translate and score with a trained checkpoint.

    python evaluate.py checkpoint=outputs/.../checkpoints/checkpoint_best.pt
    python evaluate.py checkpoint=PATH splits=[test_2016_flickr] beam=4 lenpen=0.6
    python evaluate.py checkpoint=PATH mode=files src_file=my.en ref_file=my.de
    echo "A dog runs." | python evaluate.py checkpoint=PATH mode=interactive
    python evaluate.py checkpoint=RUN_A ensemble=[RUN_B,RUN_C] average_last=10  # an ensemble

Prints sacreBLEU (cased, detokenized, with its signature), lowercased BLEU and chrF per
split, and writes the translations to ``output_dir/<split>.<src>-<tgt>.hyp`` (by default
``translations/`` in the checkpoint's run directory). Logs go to stderr, so in interactive
mode stdout holds only translations.
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
