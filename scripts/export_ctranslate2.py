"""Export a checkpoint as a CTranslate2 model, our tokenizer beside it (pip install -e ".[deploy]").

    python scripts/export_ctranslate2.py --checkpoint outputs/.../checkpoints/checkpoint_best.pt \\
        --output ct2_model/
    python scripts/export_ctranslate2.py --checkpoint exported/ --output ct2_int8/ \\
        --quantization int8

CHECKPOINT: a checkpoint file, a run directory (its checkpoint_last.pt), a folder of
scripts/export.py, or a Marian model converted by scripts/convert_marian.py. OUTPUT (new,
or empty) gets CTranslate2's files and our tokenizer (transformer/ctranslate2_export.py);
the README's "Deploying" section translates with them. A model option that CTranslate2
cannot express (ALiBi, say) is refused, naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.checkpoint import CheckpointError
from transformer.ctranslate2_export import UnsupportedModel, export_ctranslate2

QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                 "float16", "bfloat16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a checkpoint file, run directory or exported folder")
    parser.add_argument("--output", type=Path, required=True,
                        help="the folder to write (new, or empty)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="CTranslate2's weight type (default: float32)")
    parser.add_argument("--trust-modules", nargs="*", default=[], metavar="MODULE",
                        help="packages whose model parts the checkpoint may name")
    args = parser.parse_args()
    try:
        export_ctranslate2(args.checkpoint, args.output, args.quantization, args.trust_modules)
    except (CheckpointError, UnsupportedModel) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {args.output} "
          f"({args.quantization or 'float32'} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
