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

import sys

import hydra
from omegaconf import DictConfig

from transformer.checkpoint import CheckpointError
from transformer.config import ConfigError, register_configs
from transformer.data import DataError
from transformer.evaluation import evaluate

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (ConfigError, CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
