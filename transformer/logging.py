"""Metric logging: a TensorBoard writer for rank 0 and a no-op twin for everyone else.

Tags follow ``split/name`` (``train/loss``, ``val/bleu``): the same names appear in the log
lines and in the value a sweep optimises.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import Tensor


class NullLogger:
    """Accepts everything, writes nothing (non-zero ranks, logger.tensorboard=false)."""

    def scalars(self, metrics: dict[str, float], step: int) -> None: ...

    def text(self, tag: str, text: str, step: int) -> None: ...

    def attention_map(self, tag: str, weights: Tensor, x_labels: list[str],
                      y_labels: list[str], step: int, title: str | None = None) -> None: ...

    def hparams(self, hparams: dict[str, Any], trial_id: str) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger(NullLogger):
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run logged after its last checkpoint, so a
        # resumed run continues one clean curve. That needs the new event file to sort
        # after the old ones.
        wait_for_a_later_second(Path(log_dir))
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def attention_map(self, tag: str, weights: Tensor, x_labels: list[str],
                      y_labels: list[str], step: int, title: str | None = None) -> None:
        """weights (Tq, Tk) of one head, keys on the x axis and queries on the y axis;
        ``title`` (default: the tag) says which layer and head they are."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        size = (2 + 0.28 * len(x_labels), 2 + 0.28 * len(y_labels))
        figure, axes = plt.subplots(figsize=size)
        axes.imshow(weights.float().cpu().numpy(), cmap="viridis", vmin=0.0)
        axes.set_xticks(range(len(x_labels)), x_labels, rotation=90, fontsize=8)
        axes.set_yticks(range(len(y_labels)), y_labels, fontsize=8)
        axes.set_title(title or tag, fontsize=9)
        figure.tight_layout()
        self.writer.add_figure(tag, figure, step)  # closes the figure

    def hparams(self, hparams: dict[str, Any], trial_id: str) -> None:
        """Register the run with the HParams plugin in this same directory, so the runs of
        a sweep compare in one table, in the row named ``trial_id``. Only the run's session
        start is written, no experiment summary: TensorBoard then builds the table from all
        runs and puts the keys whose values differ between them first (with a summary per
        run, as ``SummaryWriter.add_hparams`` writes, it takes one run's and sorts all keys
        by name). The metric columns are the run's scalars."""
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                  for k, v in hparams.items()}
        self.writer.file_writer.add_summary(hparams_pb(values, trial_id=trial_id))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wait_for_a_later_second(log_dir: Path) -> None:
    """TensorBoard reads a directory's event files in name order, and a name starts with
    the second the file was made, then host, pid and a per-process counter compared as
    text. A file made in the same second as an earlier one could sort before it (its
    events then come first, and a resume marker of the earlier file purges them), so a new
    writer waits, at most a second, until the clock is past the newest file's second."""
    stamps = [path.name.split(".")[3] for path in log_dir.glob("events.out.tfevents.*")]
    seconds = [int(stamp) for stamp in stamps if stamp.isdigit()]
    if seconds:
        time.sleep(max(0.0, max(seconds) + 1 - time.time()))
