"""Build the tokenizer and the encoded splits, and print what each split gave:

    python scripts/prepare_data.py                              # Multi30k en->de, $MULTI30K_DIR
    python scripts/prepare_data.py data.src_lang=de data.tgt_lang=en data.vocab_size=10000
    python scripts/prepare_data.py data=parallel_files data.root=corpus/
    python scripts/prepare_data.py data=hub data.hub_name=wmt/wmt14 data.hub_config=de-en

A second run with the same files and options loads everything from ``data.cache_dir``.
Bad data (misaligned files, bytes that are not UTF-8, a missing split, ...) ends the run
with one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from transformer.config import ConfigError, register_configs
from transformer.data import DataError, prepare_data
from transformer.tokenizer_files import tokenizers_from_config

register_configs()

# Nothing of this run is worth keeping: no run folder in outputs/, no .hydra/, no log file.
QUIET_HYDRA = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none",
               "hydra/hydra_logging=none")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    try:
        data_cfg = OmegaConf.to_object(cfg.data)
        data = prepare_data(data_cfg, given_tokenizers=tokenizers_from_config(data_cfg))
    except (DataError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(data.stats_table())
    print(f"prepare_data: {time.perf_counter() - start:.2f} s, cache: {data.cache_dir}")


def with_quiet_hydra(argv: list[str]) -> list[str]:
    """``argv`` with QUIET_HYDRA's overrides in front, except those the user gave."""
    given = {arg.split("=")[0].lstrip("+~") for arg in argv[1:]}
    return [argv[0], *(o for o in QUIET_HYDRA if o.split("=")[0] not in given), *argv[1:]]


if __name__ == "__main__":
    sys.argv = with_quiet_hydra(sys.argv)
    main()
