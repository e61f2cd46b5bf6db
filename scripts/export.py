"""Export a checkpoint's model to share: weights as safetensors, config and tokenizer as JSON.

    python scripts/export.py outputs/.../checkpoints/checkpoint_best.pt exported/
    python scripts/export.py outputs/2026-11-26/10-00-00 exported/ --average-last 5
    python evaluate.py checkpoint=exported/ mode=files src_file=my.en ref_file=my.de

OUT_DIR gets ``model.safetensors``, ``config.json`` and ``tokenizer.json`` (or
``tokenizer_src.json`` and ``tokenizer_tgt.json`` for separate vocabularies); see
``transformer/export.py``. Nothing in it is a pickle: loading it runs no code from the files.
The optimizer state is not exported: the folder is for translating and fine-tuning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.checkpoint import (
    CheckpointError,
    average_checkpoints,
    last_checkpoints,
    load_checkpoint,
    read_checkpoint,
)
from transformer.export import write_export


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="a checkpoint file, or a run directory (its checkpoint_last.pt)")
    parser.add_argument("out_dir", type=Path, help="the folder to write (new, or empty)")
    parser.add_argument("--average-last", type=int, default=1, metavar="N",
                        help="export the average of the run directory's newest N checkpoints")
    args = parser.parse_args()
    try:
        if args.average_last > 1:
            paths = last_checkpoints(args.checkpoint, args.average_last)
            state = average_checkpoints(paths)
        else:
            state = read_checkpoint(args.checkpoint)
        load_checkpoint(state, name=str(args.checkpoint))  # weights that fit their config
        write_export(state, args.out_dir)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} (step {state['step']}) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
