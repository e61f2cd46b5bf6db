"""Training step time with and without batches prefetched (``data.prefetch``), end to end:
train.py on a real corpus, the data path included, the two settings in alternating rounds.

    python scripts/benchmark_prefetch.py                       # the Multi30k recipe, CPU
    python scripts/benchmark_prefetch.py --steps 200 --rounds 3 -- trainer.device=cuda

Each run trains ``--steps`` steps (logged every ``--every``), without validation or saving
in between; the time per step is measured between the first and the last logged step (so
start-up, tokenization and the first batch do not count). Runs go under ``--work``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"^\[(?P<time>[\d\- :,]+)\]\[transformer\]\[INFO\] - step (?P<step>\d+) \|"
                       r" loss ")


def seconds_per_step(log: str) -> float:
    """From the train log's ``step N | loss ...`` lines: (last - first time) / steps."""
    points = [(int(m["step"]), datetime.strptime(m["time"], "%Y-%m-%d %H:%M:%S,%f"))
              for m in map(STEP_LINE.match, log.splitlines()) if m]
    if len(points) < 2:
        raise SystemExit(f"fewer than two logged steps in the run's output:\n{log[-2000:]}")
    (first_step, first), (last_step, last) = points[0], points[-1]
    return (last - first).total_seconds() / (last_step - first_step)


def run(prefetch: int, args: argparse.Namespace, work: Path, index: int) -> float:
    never = 10**9
    command = [sys.executable, str(REPO / "train.py"), f"experiment={args.experiment}",
               f"data.prefetch={prefetch}", f"trainer.max_steps={args.steps}",
               f"trainer.log_every_steps={args.every}", f"trainer.val_every_steps={never}",
               f"trainer.save_every_steps={never}", f"data.cache_dir={work / 'cache'}",
               f"hydra.run.dir={work / f'run-{index}-prefetch{prefetch}'}", *args.overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds_per_step(result.stdout + result.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="multi30k_en_de")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--depth", type=int, default=2, help="data.prefetch of the rows with it")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="more train.py overrides (after --)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="benchmark-prefetch-"))
    times: dict[int, list[float]] = {0: [], args.depth: []}
    for index in range(args.rounds):
        for prefetch in times:  # alternating, so a change of load touches both alike
            times[prefetch].append(run(prefetch, args, work, index))
            print(f"round {index + 1}, data.prefetch={prefetch}: "
                  f"{times[prefetch][-1]:.3f} s/step", flush=True)
    print("\n| data.prefetch | s/step, each round | median |\n|---|---|---|")
    for prefetch, values in times.items():
        print(f"| {prefetch} | {', '.join(f'{v:.3f}' for v in values)} | "
              f"{statistics.median(values):.3f} |")
    ratio = statistics.median(times[0]) / statistics.median(times[args.depth])
    print(f"\nwithout / with prefetch: {ratio:.3f}x  (runs in {work})")


if __name__ == "__main__":
    main()
