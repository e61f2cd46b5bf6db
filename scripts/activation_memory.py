"""Peak memory and step time of one training step, with and without activation
checkpointing (``trainer.activation_checkpointing``), on the CPU or a GPU:

    python scripts/activation_memory.py                         # model=base, CPU, fp32
    python scripts/activation_memory.py --device cuda --batch-size 256 --length 64

The step is the trainer's (``train_step``: the chunked label-smoothed loss, fused AdamW,
clipping) on ``configs/model/<model>.yaml``, over a batch of random tokens without padding
(``--batch-size`` sentences of ``--length`` tokens a side; 128 x 32 is a full
``data.max_tokens=4096`` batch of Multi30k-length sentences). Each setting runs in a fresh
process, ``--repeats`` times, alternating (a busy host slows both alike), each run one
warm-up step and ``--steps`` timed ones. Peak memory: on the CPU the process's peak
resident set (``ru_maxrss``; glibc keeps freed blocks as the trainer makes it do, so this
is the heap's high-water mark), on a GPU ``torch.cuda.max_memory_allocated``. "above the
weights" is the peak less what the process held before the first step (weights built):
gradients, optimizer state and activations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformer.config import ModelConfig, OptimConfig  # noqa: E402
from transformer.data import Batch  # noqa: E402
from transformer.model import build_model, count_parameters  # noqa: E402
from transformer.optim import build_optimizer  # noqa: E402
from transformer.precision import Precision  # noqa: E402
from transformer.trainer import retain_freed_memory, train_step  # noqa: E402

BOS = 1


def resident_bytes() -> int:
    """This process's resident set now (Linux: /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def random_batch(batch_size: int, length: int, vocab_size: int, device: torch.device) -> Batch:
    """Random tokens, ids 3.. (no pad, BOS or EOS inside)."""
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    tgt = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    tgt_input = torch.cat([torch.full((batch_size, 1), BOS), tgt[:, :-1]], dim=1)
    n_tokens = batch_size * length
    return Batch(src, tgt_input, tgt, list(range(batch_size)), n_tokens, n_tokens).to(device)


def child(args: argparse.Namespace) -> dict:
    """One process, one setting: the measurements as a dict."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cpu":
        retain_freed_memory()  # as the trainer does on the CPU
    torch.manual_seed(0)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                OmegaConf.load(REPO / "configs" / "model" / f"{args.model}.yaml"))
    model = build_model(OmegaConf.to_object(model_cfg), args.vocab, args.vocab).to(device)
    model.set_activation_checkpointing(args.child == "on")
    optimizer = build_optimizer(model, OptimConfig(), device)
    precision = Precision.resolve(args.precision, device)
    batch = random_batch(args.batch_size, args.length, args.vocab, device)

    def step() -> float:
        start = time.perf_counter()
        train_step(model, [batch], optimizer, precision.grad_scaler(), precision, 1.0, 0.1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_bytes()
    step()  # warm-up: allocates gradients and optimizer state
    times = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"setting": args.child, "peak": peak, "before": before, "times": times,
            "parameters": count_parameters(model), "precision": precision.name}


def run_child(args: argparse.Namespace, setting: str) -> dict:
    command = [sys.executable, __file__, "--child", setting, "--device", args.device,
               "--model", args.model, "--batch-size", str(args.batch_size), "--length",
               str(args.length), "--vocab", str(args.vocab), "--steps", str(args.steps),
               "--threads", str(args.threads), "--precision", args.precision]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"error: the {setting} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="base", help="configs/model/<model>.yaml")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--length", type=int, default=32, help="tokens per sentence, a side")
    parser.add_argument("--vocab", type=int, default=8000, help="shared vocabulary size")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
    parser.add_argument("--json", type=Path, help="also write the runs here")
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = [run_child(args, setting) for _ in range(args.repeats) for setting in ("off", "on")]
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    first = runs[0]
    print(f"model={args.model} ({first['parameters']:,} parameters), {args.batch_size} x "
          f"{args.length} tokens a side, {first['precision']}, {args.device}, "
          f"{args.threads} thread(s)")
    print(f"{'activation checkpointing':26} {'peak MiB':>9} {'above weights':>14} "
          f"{'step s (median)':>16}")
    summary = {}
    for setting in ("off", "on"):
        mine = [run for run in runs if run["setting"] == setting]
        peak = statistics.median(run["peak"] for run in mine) / 2**20
        above = statistics.median(run["peak"] - run["before"] for run in mine) / 2**20
        seconds = statistics.median(t for run in mine for t in run["times"])
        summary[setting] = (peak, above, seconds)
        print(f"{setting:26} {peak:9.0f} {above:14.0f} {seconds:16.2f}")
    (peak_off, above_off, time_off), (peak_on, above_on, time_on) = summary["off"], summary["on"]
    print(f"checkpointing: peak {peak_on - peak_off:+.0f} MiB ({peak_on / peak_off - 1:+.0%}), "
          f"above the weights {above_on / above_off - 1:+.0%}, step time "
          f"{time_on / time_off - 1:+.0%}")


if __name__ == "__main__":
    main()
