"""Metric logging: a TensorBoard writer for rank 0 and a no-op twin for everyone else;
Weights & Biases and MLflow beside or instead of it (``logger=wandb``, ``logger=mlflow``,
``logger=[tensorboard,wandb]``: ``build_logger``).

Tags follow ``split/name`` (``train/loss``, ``val/bleu``): the same names appear in the log
lines and in the value a sweep optimises, and in every tracker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from transformer.config import ConfigError

TRACKERS_FILE = "trackers.json"  # in the run directory: {"wandb": run id, "mlflow": run id}
EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # package, extra
log = logging.getLogger(__name__)


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


class WandbLogger(NullLogger):
    """Weights & Biases (``logger=wandb``): scalars against a ``trainer/step`` axis (a
    resumed run may log steps again that a killed one logged past its last checkpoint, which
    W&B's own step, which only grows, would drop), text samples as a table a tag, the
    hyperparameters as the run's config. ``run_id``: the run to continue (a resume), or
    None for a new one. ``WANDB_MODE=offline`` logs to files only (``wandb sync`` uploads)."""

    def __init__(self, run_dir: Path, project: str, entity: str | None, name: str,
                 run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, entity=entity, name=name[:128], id=run_id,
                              dir=str(run_dir), resume="allow" if run_id else None)
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")
        self.rows: dict[str, list[list[Any]]] = {}

    @property
    def run_id(self) -> str:
        return self.run.id

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "trainer/step": step})

    def text(self, tag: str, text: str, step: int) -> None:
        # W&B shows a table as logged last: the rows of every step so far.
        self.rows.setdefault(tag, []).append([step, text])
        table = self.wandb.Table(columns=["step", "text"], data=self.rows[tag])
        self.run.log({tag: table, "trainer/step": step})

    def hparams(self, hparams: dict[str, Any], trial_id: str) -> None:
        # A resumed run may change a value (trainer.max_steps, say): the newest is kept.
        self.run.config.update(hparams, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(NullLogger):
    """MLflow (``logger=mlflow``): scalars as metrics at their step, text samples as
    artifacts ``<tag>/step_<step>.md``, the hyperparameters as params, in the experiment
    ``experiment`` of ``tracking_uri`` (None: ``$MLFLOW_TRACKING_URI``, else MLflow's
    default). ``run_id``: the run to continue (a resume), or None for a new one."""

    def __init__(self, tracking_uri: str | None, experiment: str, name: str,
                 run_id: str | None):
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.Metric, self.Param = Metric, Param
        try:
            self.client = MlflowClient(tracking_uri)
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
            else:
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found is not None else \
                    self.client.create_experiment(experiment)
                run_id = self.client.create_run(experiment_id, run_name=name[:250]
                                                ).info.run_id
        except MlflowException as error:  # a store it cannot use: say which, in one line
            where = tracking_uri or "its default store ($MLFLOW_TRACKING_URI unset)"
            hint = "MLFLOW_ALLOW_FILE_STORE=true lets MLflow 3 use it, or set " \
                if "MLFLOW_ALLOW_FILE_STORE" in error.message else "set "
            raise ConfigError(f"logger=mlflow: MLflow cannot log to {where}: "
                              f"{first_sentence(error.message)} ({hint}"
                              "logger.mlflow_tracking_uri or $MLFLOW_TRACKING_URI)") from None
        self.run_id = run_id

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            self.Metric(tag, float(value), now, step) for tag, value in metrics.items()])

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step}.md")

    def hparams(self, hparams: dict[str, Any], trial_id: str) -> None:
        # MLflow keeps a param's first value: a resumed run logs the new keys only, and
        # says which values it changed.
        logged = self.client.get_run(self.run_id).data.params
        new = {key: str(value) for key, value in hparams.items() if key not in logged}
        changed = sorted(k for k, v in hparams.items() if k in logged and logged[k] != str(v))
        if changed:
            log.warning("MLflow keeps the first value of a param: not updated on resume: %s",
                        ", ".join(changed))
        params = [self.Param(key, value) for key, value in new.items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def first_sentence(text: str) -> str:
    line = " ".join(text.split())
    return line.split(". ")[0].rstrip(".")


class Loggers(NullLogger):
    """Several loggers as one (``logger=[tensorboard,wandb]``): each call goes to each."""

    def __init__(self, loggers: Iterable[NullLogger]):
        self.loggers = list(loggers)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.scalars(metrics, step)

    def text(self, tag: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.text(tag, text, step)

    def attention_map(self, tag: str, weights: Tensor, x_labels: list[str],
                      y_labels: list[str], step: int, title: str | None = None) -> None:
        for logger in self.loggers:
            logger.attention_map(tag, weights, x_labels, y_labels, step, title)

    def hparams(self, hparams: dict[str, Any], trial_id: str) -> None:
        for logger in self.loggers:
            logger.hparams(hparams, trial_id)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def check_trackers(cfg: Any) -> None:
    """Refuse, before any slow work, a tracker whose package is not installed: one line
    naming the extra that installs it. ``cfg``: the ``logger`` config."""
    for tracker, (package, extra) in EXTRAS.items():
        if cfg[tracker]:
            try:
                __import__(package)
            except ImportError:
                raise ConfigError(f"logger={tracker} needs the {package} package: "
                                  f'pip install -e ".[{extra}]"') from None


def build_logger(cfg: Any, run_dir: Path, resumed_step: int | None,
                 hparams: dict[str, Any], trial: str) -> NullLogger:
    """The loggers the ``logger`` config turns on, for rank 0, each given the run's
    hyperparameters (``hparams``, named ``trial``). ``resumed_step``: the step a resumed
    run continues from (TensorBoard purges what a killed run logged past it; W&B and
    MLflow continue the run whose id ``trackers.json`` in ``run_dir`` holds), None for a
    new run."""
    check_trackers(cfg)
    ids = read_tracker_ids(run_dir) if resumed_step is not None else {}
    loggers: list[NullLogger] = []
    if cfg.tensorboard:
        purge = resumed_step + 1 if resumed_step is not None else None
        loggers.append(TensorBoardLogger(run_dir / "tb", purge_step=purge))
    if cfg.wandb:
        loggers.append(WandbLogger(run_dir, cfg.wandb_project, cfg.wandb_entity, trial,
                                   ids.get("wandb")))
        ids["wandb"] = loggers[-1].run_id
    if cfg.mlflow:
        loggers.append(MlflowLogger(cfg.mlflow_tracking_uri, cfg.mlflow_experiment, trial,
                                    ids.get("mlflow")))
        ids["mlflow"] = loggers[-1].run_id
    if cfg.wandb or cfg.mlflow:
        (run_dir / TRACKERS_FILE).write_text(json.dumps(ids, indent=2) + "\n")
    logger = loggers[0] if len(loggers) == 1 else Loggers(loggers) if loggers else NullLogger()
    logger.hparams(hparams, trial)
    return logger


def read_tracker_ids(run_dir: Path) -> dict[str, str]:
    """The tracker run ids a run directory's ``trackers.json`` holds (none: {})."""
    path = run_dir / TRACKERS_FILE
    try:
        ids = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not readable JSON ({error}): remove it to start new "
                          "W&B / MLflow runs") from None
    return {key: value for key, value in ids.items() if isinstance(value, str)}
