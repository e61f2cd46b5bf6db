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

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transformer.cli import entry_point
from transformer.config import TrainConfig, register_configs
from transformer.distributed import register_run_stamp_resolver
from transformer.trainer import train

register_configs()
register_run_stamp_resolver()


# A user error (a bad key or value, bad data, a run directory that cannot be written)
# prints one line `error: ...` and exits 2: transformer/cli.py.
@entry_point("train", TrainConfig)
def main(cfg: DictConfig) -> float:
    return train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
