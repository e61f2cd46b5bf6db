"""Data preparation on corpora of millions of pairs: time, pairs/s, peak memory, cache size,
and how soon the first training batch arrives once the cache exists.

    python scripts/benchmark_data.py --pairs 500000 1000000 5000000
    python scripts/benchmark_data.py --pairs 200000 --multi30k /path/to/multi30k

The corpus is synthetic but realistic text: each pair recombines two Multi30k training
pairs on both sides alike (the two sentences one after the other, or the first half of
one and the second half of the other), so lengths and words are Multi30k's. Each size is
prepared in a fresh process (``data=parallel_files``, default options); its peak RSS is that
process's own (``os.wait4``), its cache a new folder. Everything goes under ``--work``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PREPARE = """
import sys
from transformer.config import DataConfig
from transformer.data import prepare_data
cfg = DataConfig(source="parallel_files", root=sys.argv[1], cache_dir=sys.argv[2],
                 valid_split="valid", test_splits=[])
prepare_data(cfg, ["train"], log=lambda line: print(line, flush=True))
"""

FIRST_BATCH = """
import sys, time
start = time.perf_counter()
from transformer.config import DataConfig
from transformer.data import TokenBatchSampler, collate, prepare_data
cfg = DataConfig(source="parallel_files", root=sys.argv[1], cache_dir=sys.argv[2],
                 valid_split="valid", test_splits=[])
train = prepare_data(cfg, ["train"], log=lambda line: None).splits["train"]
assert train.stats.cached, "the cache was not used"
sampler = TokenBatchSampler.for_split(train, cfg.max_tokens)
batch = collate(train, sampler.batches(epoch=0)[0])
print(f"{time.perf_counter() - start:.2f}")
"""


def synthetic_corpus(multi30k: Path, pairs: int, folder: Path, seed: int = 0) -> None:
    """``folder/train.{en,de}`` of ``pairs`` recombined Multi30k pairs (see the module)."""
    src, tgt = (gzip.decompress((multi30k / f"train.{lang}.gz").read_bytes())
                .decode("utf-8").splitlines() for lang in ("en", "de"))
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.en", "w", encoding="utf-8") as src_out, \
            open(folder / "train.de", "w", encoding="utf-8") as tgt_out:
        for _ in range(pairs):
            i, j = rng.randrange(len(src)), rng.randrange(len(src))
            if rng.random() < 0.5:
                pair = (f"{src[i]} {src[j]}", f"{tgt[i]} {tgt[j]}")
            else:
                pair = tuple(_halves(side[i], side[j]) for side in (src, tgt))
            src_out.write(pair[0] + "\n")
            tgt_out.write(pair[1] + "\n")


def _halves(first: str, second: str) -> str:
    a, b = first.split(), second.split()
    return " ".join(a[:len(a) // 2] + b[len(b) // 2:])


def run_measured(code: str, *args: str) -> tuple[float, float, str]:
    """Run ``code`` in a fresh Python; its wall seconds, peak RSS (MiB) and stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                               stdout=subprocess.PIPE, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"error: the run failed (exit {process.returncode}):\n{stdout}")
    return seconds, usage.ru_maxrss / 1024, stdout  # ru_maxrss is in KiB on Linux


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[500_000, 1_000_000])
    parser.add_argument("--multi30k", type=Path,
                        default=Path(os.environ.get("MULTI30K_DIR", "/work/shared/data/multi30k")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/benchmark_data"))
    args = parser.parse_args()
    print("| pairs | corpus MiB | prepare s | pairs/s | peak RSS MiB | cache MiB "
          "| first batch s (cached) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for pairs in args.pairs:
        corpus, cache = args.work / f"corpus-{pairs}", args.work / f"cache-{pairs}"
        if not (corpus / "train.de").exists():
            synthetic_corpus(args.multi30k, pairs, corpus)
        shutil.rmtree(cache, ignore_errors=True)
        seconds, peak_mib, log = run_measured(PREPARE, str(corpus), str(cache))
        first_batch, _, stdout = run_measured(FIRST_BATCH, str(corpus), str(cache))
        print(f"| {pairs:,} | {folder_size(corpus) / 2**20:,.0f} | {seconds:.0f} | "
              f"{pairs / seconds:,.0f} | {peak_mib:,.0f} | {folder_size(cache) / 2**20:,.0f} | "
              f"{float(stdout.split()[-1]):.1f} |", flush=True)
        print("  " + log.strip().replace("\n", "\n  "), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
