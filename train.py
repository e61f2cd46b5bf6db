"""Train a Transformer: ``python train.py [group=option ...] [key=value ...]``.

    python train.py model=base optim.lr=7e-4           # one run, in outputs/<date>/<time>/
    python train.py -m model.n_layers=3,6              # a sweep, in multirun/<date>/<time>/
    python train.py debug=fast                         # a few dozen steps of a tiny model
    torchrun --standalone --nproc_per_node=4 train.py  # data-parallel on 4 GPUs (DDP)
    tensorboard --logdir outputs                       # the curves

Configs live in configs/ (train.yaml lists the groups); the loop lives in
transformer/trainer.py.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transformer.checkpoint import CheckpointError
from transformer.config import ConfigError, register_configs
from transformer.data import DataError
from transformer.distributed import register_run_stamp_resolver
from transformer.trainer import train

register_configs()
register_run_stamp_resolver()
log = logging.getLogger("transformer")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, DataError, CheckpointError, FloatingPointError) as error:
        # One clear line instead of a traceback: the message names the key, file or step.
        log.error("%s: %s", type(error).__name__, error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
