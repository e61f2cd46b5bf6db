"""Our beam search against the CTranslate2 export (float32 and int8) on one corpus: the
share of identical translations, BLEU, sentences/s (docs/benchmarks.md has the results).

    python scripts/compare_ctranslate2.py --checkpoint outputs/.../checkpoints/checkpoint_best.pt \\
        --src $MULTI30K_DIR/val.en.gz --ref $MULTI30K_DIR/val.de.gz --threads 2

Every system decodes the same sentences with the same settings: beam, length penalty,
maximum length ``int(1.2 * source tokens + 10)`` per sentence; ours with
``early_stopping=True``, which is CTranslate2's stopping rule (ours by default too, for
reference: it waits until no live hypothesis can win). A difference of a sentence is
explained where it is one of the two known ones (transformer/ctranslate2_export.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import sacrebleu
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformer.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from transformer.ctranslate2_export import (  # noqa: E402
    export_ctranslate2,
    load_ctranslate2,
    max_decoding_lengths,
    translate_ctranslate2,
    vocabularies,
)
from transformer.data import read_lines  # noqa: E402
from transformer.tokenizer import EOS_ID  # noqa: E402
from transformer.translation import translate_ids  # noqa: E402


def timed(run):
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--src", type=Path, required=True, help="source sentences, a line each")
    parser.add_argument("--ref", type=Path, required=True, help="their references")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--lenpen", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = read_checkpoint(args.checkpoint)
    model, tokenizer, _ = load_checkpoint(state, name=str(args.checkpoint))
    sources, references = read_lines(args.src), read_lines(args.ref)
    src_ids = [ids + [EOS_ID] for ids in tokenizer.encode_batch(sources)]
    src_vocab, tgt_vocab = vocabularies(state["tokenizer"])
    ct2_input = [[src_vocab[i] for i in ids[:-1]] for ids in src_ids]
    search = dict(beam=args.beam, lenpen=args.lenpen)
    outputs, seconds = {}, {}
    outputs["ours"], seconds["ours"] = timed(lambda: translate_ids(
        model, src_ids, early_stopping=True, **search))
    outputs["ours (exact stop)"], seconds["ours (exact stop)"] = timed(
        lambda: translate_ids(model, src_ids, **search))
    with tempfile.TemporaryDirectory() as tmp:
        for name, quantization in [("ctranslate2 float32", None), ("ctranslate2 int8", "int8")]:
            directory = export_ctranslate2(state, Path(tmp) / name.split()[-1], quantization)
            translator, _, _ = load_ctranslate2(directory, threads=args.threads)
            outputs[name], seconds[name] = timed(lambda t=translator: translate_ctranslate2(
                t, ct2_input, tgt_vocab, max_len=model.max_len, **search))
    limits = max_decoding_lengths([len(ids) for ids in src_ids], 1.2, 10, model.max_len)
    report = {"sentences": len(sources), "beam": args.beam, "lenpen": args.lenpen,
              "threads": args.threads, "systems": {}}
    for name, ids in outputs.items():
        texts = tokenizer.decode_batch(ids)
        same = [a == b for a, b in zip(ids, outputs["ours"], strict=True)]
        report["systems"][name] = {
            "bleu": sacrebleu.corpus_bleu(texts, [references]).score,
            "identical_to_ours": sum(same) / len(same),
            "sentences_per_s": len(sources) / seconds[name], "seconds": seconds[name]}
        print(f"{name:<22} BLEU {report['systems'][name]['bleu']:6.2f}  identical "
              f"{sum(same):>5}/{len(same)}  {len(sources) / seconds[name]:7.1f} sentences/s")
    differing = [i for i, (a, b) in enumerate(zip(outputs["ctranslate2 float32"],
                                                  outputs["ours"], strict=True)) if a != b]
    # The known difference: at the maximum length ours forces EOS, CTranslate2 does not.
    at_limit = [i for i in differing if len(outputs["ours"][i]) == limits[i] - 1
                or len(outputs["ctranslate2 float32"][i]) == limits[i]]
    report["float32_differences"] = {"sentences": differing, "at_maximum_length": at_limit}
    print(f"float32 differs in {len(differing)} sentences, {len(at_limit)} of them at the "
          "maximum length (ours forces EOS there, CTranslate2 does not)")
    for i in differing:
        if i not in at_limit:
            print(f"  line {i + 1}: ours {tokenizer.decode_batch([outputs['ours'][i]])[0]!r}\n"
                  f"  {'':>{len(str(i + 1)) + 5}} ct2  "
                  f"{tokenizer.decode_batch([outputs['ctranslate2 float32'][i]])[0]!r}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
