"""Plot the training and validation curves of runs from their TensorBoard events.

    python scripts/plot_curves.py outputs/2026-11-26/14-00-00 --label en-de \\
        outputs/2026-11-26/15-00-00 --label de-en --output docs/img/multi30k_curves.png

One figure, three panels: train/loss and val/loss, val/bleu, and the learning rate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

PANELS = [("loss", ["train/loss", "val/loss"]), ("val BLEU (greedy)", ["val/bleu"]),
          ("learning rate", ["train/lr"])]


def scalars(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in events.Tags()["scalars"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with tb/)")
    parser.add_argument("--label", action="append", default=[], help="one per run, in order")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    labels = args.label + [run.name for run in args.runs[len(args.label):]]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for run, label in zip(args.runs, labels, strict=True):
        curves = scalars(run)
        for axis, (title, tags) in zip(axes, PANELS, strict=True):
            for tag in tags:
                if tag in curves:
                    style = "--" if tag.startswith("val/") and len(tags) > 1 else "-"
                    axis.plot(*curves[tag], style, label=f"{label} {tag}")
            axis.set_title(title)
            axis.set_xlabel("step")
    for axis in axes:
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
