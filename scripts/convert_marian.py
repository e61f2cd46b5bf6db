"""Convert an OPUS-MT (Marian) model saved by Hugging Face into our checkpoint format.

    python scripts/convert_marian.py --input opus-mt-en-de/ --output opus-mt-en-de.pt
    python evaluate.py checkpoint=opus-mt-en-de.pt mode=files src_file=my.en ref_file=my.de

The input directory is what ``MarianMTModel.save_pretrained`` and
``MarianTokenizer.save_pretrained`` write (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, ``source.spm``, ``target.spm``, ``vocab.json``), e.g. a local copy
of a ``Helsinki-NLP/opus-mt-*`` repository. Needs ``pip install -e .[marian]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.checkpoint import CheckpointError, save_checkpoint
from transformer.marian import MarianConversionError, convert_marian


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="a saved MarianMTModel")
    parser.add_argument("--output", type=Path, required=True, help="the checkpoint to write")
    args = parser.parse_args()
    try:
        save_checkpoint(convert_marian(args.input), args.output)
    except (MarianConversionError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
