"""Average the weights of several checkpoints (paper 6.1).

    python scripts/average_checkpoints.py --inputs a.pt b.pt --output avg.pt
    python scripts/average_checkpoints.py --last 5 outputs/2026-11-26/10-00-00 --output avg.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.checkpoint import (
    CheckpointError,
    average_checkpoints,
    last_checkpoints,
    save_checkpoint,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", nargs="+", type=Path, help="checkpoint files")
    source.add_argument("--last", nargs=2, metavar=("N", "RUN_DIR"),
                        help="the last N numbered checkpoints of a run directory")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    try:
        paths = args.inputs or last_checkpoints(Path(args.last[1]), int(args.last[0]))
        state = average_checkpoints(paths)
        save_checkpoint(state, args.output)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"averaged {len(paths)} checkpoints into {args.output}: "
          + ", ".join(p.name for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
