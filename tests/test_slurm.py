"""Real SLURM jobs through hydra-submitit-launcher, on the one-machine cluster of
scripts/slurm_local.sh (configs/hydra/launcher/slurm_local.yaml): a sweep of two jobs, a
job of two tasks that train as two DDP ranks, and a job requeued mid-run (by SLURM, or by
submitit on its timeout notice) that resumes from its checkpoint. Skipped when no cluster
answers (start one with ``scripts/slurm_local.sh start``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_distributed import COMMON
from tests.test_train import compose_config
from transformer.checkpoint import read_checkpoint
from transformer.trainer import train

REPO = Path(__file__).resolve().parents[1]


def cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and result.stdout.strip() != ""


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not cluster_answers(), reason="no SLURM cluster answers sinfo "
                       "(slurmctld not running): start one with scripts/slurm_local.sh start"),
]
pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher is not installed (the `slurm` extra)")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def sweep_command(args: list[str], sweep_dir: Path, cache: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm_local", *COMMON,
            *args, f"data.cache_dir={cache}", f"hydra.sweep.dir={sweep_dir}"]


def job_env(multi30k_dir: Path) -> dict[str, str]:
    # sbatch passes the environment on: the jobs import this checkout, read this corpus
    return {**os.environ, "MULTI30K_DIR": str(multi30k_dir), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def launch(args: list[str], sweep_dir: Path, cache: Path, multi30k_dir: Path,
           cwd: Path) -> subprocess.CompletedProcess:
    """``train.py -m hydra/launcher=slurm_local ...``: submits, waits for the jobs."""
    return subprocess.run(sweep_command(args, sweep_dir, cache), cwd=cwd,
                          env=job_env(multi30k_dir), capture_output=True, text=True,
                          timeout=300)


def job_logs(sweep_dir: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(sweep_dir.glob(".submitit/*/*.out")))


def test_a_sweep_runs_one_slurm_job_per_point(multi30k_dir, data_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = launch(["trainer.max_steps=4", "trainer.seed=1,2"], sweep_dir, data_cache,
                    multi30k_dir, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + job_logs(sweep_dir)[-3000:]
    tasks = {path.name for path in (sweep_dir / ".submitit").iterdir() if path.is_dir()}
    array_id = next(name for name in tasks if "_" not in name)
    assert tasks == {array_id, f"{array_id}_0", f"{array_id}_1"}  # one array job, 2 tasks
    seeds = []
    for point in ("0", "1"):
        checkpoint = read_checkpoint(sweep_dir / point / "checkpoints" / "checkpoint_last.pt")
        assert checkpoint["step"] == 4
        seeds.append(checkpoint["config"]["trainer"]["seed"])
    assert sorted(seeds) == [1, 2]


def test_two_tasks_train_as_two_ranks(multi30k_dir, data_cache, tmp_path):
    # Two tasks with grad_accum=2 read the batches one process reads with grad_accum=4
    # (tests/test_distributed.py): the same weights.
    sweep_dir = tmp_path / "sweep"
    result = launch(["trainer.max_steps=4", "trainer.grad_accum=2",
                     "hydra.launcher.tasks_per_node=2"], sweep_dir, data_cache, multi30k_dir,
                    tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + job_logs(sweep_dir)[-3000:]
    assert "parameters identical on all 2 ranks" in job_logs(sweep_dir)
    ddp = read_checkpoint(sweep_dir / "0" / "checkpoints" / "checkpoint_last.pt")
    single_dir = tmp_path / "single"
    train(compose_config([*COMMON, f"data.root={multi30k_dir}", f"data.cache_dir={data_cache}",
                          "trainer.max_steps=4", "trainer.grad_accum=4"]), single_dir)
    single = read_checkpoint(single_dir / "checkpoints" / "checkpoint_last.pt")
    assert ddp["step"] == single["step"] == 4 and ddp["world_size"] == 2
    for name, tensor in single["model"].items():
        if name.endswith("k_proj.bias"):  # rounding noise made full-size by Adam
            continue
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-4, atol=1e-5,
                                   msg=name)


def scontrol_job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as key=value pairs (JobState, Restarts, ...); {} once gone."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                            text=True, timeout=30)
    fields = {}
    for word in result.stdout.split():
        key, _, value = word.partition("=")
        fields[key] = value
    return fields


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


# How the job is stopped: SLURM's requeue (its SIGTERM, as on preemption), or submitit's
# timeout notice, sent here at once instead of signal_delay_s before the time limit;
# submitit's handler then requeues the job itself.
STOPS = {"requeue": (["scontrol", "requeue"], "SIGTERM"),
         "timeout_notice": (["scancel", "--signal=USR2"], "SIGUSR2")}


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_a_requeued_job_saves_resumes_and_ends_as_an_uninterrupted_run(
        multi30k_dir, data_cache, tmp_path, stop):
    command, signal_name = STOPS[stop]
    steps = ["trainer.max_steps=60", "trainer.save_every_steps=10",
             "trainer.val_every_steps=30", "trainer.log_every_steps=10"]
    sweep_dir = tmp_path / "sweep"
    launcher = subprocess.Popen(sweep_command(steps + ["trainer.resume=auto"], sweep_dir,
                                              data_cache),
                                cwd=tmp_path, env=job_env(multi30k_dir),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        checkpoints = sweep_dir / "0" / "checkpoints"
        wait_for(lambda: (checkpoints / "checkpoint_10.pt").exists()
                 or launcher.poll() is not None, 180, "the job's first checkpoint")
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        # one job, not an array: its folder is .submitit/<job id>
        job_id = next(path.name for path in (sweep_dir / ".submitit").iterdir() if path.is_dir())
        subprocess.run([*command, job_id], check=True, timeout=30)
        # SLURM holds a requeued job about two minutes before it may start again: the
        # job pends with a begin time; start it now instead
        wait_for(lambda: scontrol_job(job_id).get("JobState") == "PENDING", 60,
                 "the requeued job to pend")
        assert int(scontrol_job(job_id)["Restarts"]) == 1
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True,
                       timeout=30)
        output, _ = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    logs = job_logs(sweep_dir)
    assert f"received {signal_name}" in logs, logs[-3000:]
    assert ("Requeued job" in logs if stop == "timeout_notice" else "exiting 75" in logs), \
        logs[-3000:]
    assert "resuming" in logs.lower(), logs[-3000:]
    # submitit writes the result before the job's processes end: wait for SLURM's verdict
    wait_for(lambda: scontrol_job(job_id).get("JobState") not in ("RUNNING", "COMPLETING"),
             60, "the job to end")
    job = scontrol_job(job_id)  # kept a while after the end (MinJobAge)
    if job:
        assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, job
    run_dirs = [path.parent for path in sweep_dir.rglob(".hydra")]
    assert run_dirs == [sweep_dir / "0"]  # the rerun went on in the same run directory
    resumed = read_checkpoint(checkpoints / "checkpoint_last.pt")
    assert resumed["step"] == 60

    single_dir = tmp_path / "single"
    train(compose_config([*COMMON, *steps, f"data.root={multi30k_dir}",
                          f"data.cache_dir={data_cache}"]), single_dir)
    single = read_checkpoint(single_dir / "checkpoints" / "checkpoint_last.pt")
    for name, tensor in single["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=1e-5, atol=1e-6,
                                   msg=name)
