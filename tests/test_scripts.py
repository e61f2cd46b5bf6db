"""The recipe-search and curve-plotting scripts, on what they read and write (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import search_multi30k  # noqa: E402


def test_search_trials_per_direction_and_candidate(tmp_path):
    trials = search_multi30k.make_trials(["en_de", "de_en"], ["recipe", "en_de:drop0.1"],
                                         ["trainer.max_steps=10"], tmp_path)
    assert [t.label for t in trials] == ["en_de/recipe", "en_de/drop0.1", "de_en/recipe"]
    assert trials[1].overrides == ["model.dropout=0.1", "trainer.max_steps=10"]
    assert trials[2].run_dir == tmp_path / "de_en-recipe"
    with pytest.raises(SystemExit, match="unknown candidate 'nope'"):
        search_multi30k.make_trials(["en_de"], ["nope"], [], tmp_path)


def test_search_picks_the_best_val_lenpen():
    trial = search_multi30k.Trial("en_de", "recipe", [], Path("x"))
    assert trial.best_val() is None
    trial.val = {"0.6": {"bleu_lc": 30.0}, "1.0": {"bleu_lc": 31.5}, "2.0": {}}
    assert trial.best_val() == (31.5, "1.0")


def test_plot_curves_draws_the_runs_scalars(tmp_path):
    for run, scale in [("a", 1.0), ("b", 2.0)]:
        writer = SummaryWriter(tmp_path / run / "tb")
        for step in range(1, 6):
            for tag in ("train/loss", "val/loss", "val/bleu", "train/lr"):
                writer.add_scalar(tag, scale / step, step)
        writer.close()
    output = tmp_path / "img" / "curves.png"
    result = subprocess.run([sys.executable, str(REPO / "scripts/plot_curves.py"),
                             str(tmp_path / "a"), str(tmp_path / "b"), "--label", "A",
                             "--output", str(output)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 10_000


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_benchmark_measures_every_system_at_one_precision(precision, tmp_path):
    """The benchmark's tiny smoke preset: a row per system, same FLOPs for the lever
    variants of ours, and the precision given on the command line for all of them."""
    import benchmark

    report = benchmark.main(["--preset", "tiny", "--device", "cpu", "--precision", precision,
                             "--systems", "ours,ours-native-dropout,torch",
                             "--json", str(tmp_path / "r.json")])
    rows = {row["system"]: row for row in report["training"]}
    assert set(rows) == {"ours", "ours-native-dropout", "torch"}
    assert report["sizes"]["precision"] == precision
    assert all(row["tokens_per_s"] > 0 for row in rows.values())
    assert rows["ours"]["flops_per_step"] == rows["ours-native-dropout"]["flops_per_step"] > 0
    assert (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_activation_memory_measures_both_settings_in_fresh_processes(tmp_path):
    """scripts/activation_memory.py (the GPU check's recompute stage) on a tiny model."""
    result = subprocess.run([sys.executable, str(REPO / "scripts/activation_memory.py"),
                             "--model", "tiny", "--batch-size", "4", "--length", "5",
                             "--repeats", "1", "--steps", "1", "--threads", "1",
                             "--json", str(tmp_path / "runs.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [run["setting"] for run in runs] == ["off", "on"]
    assert all(run["peak"] > run["before"] > 0 and run["times"][0] > 0 for run in runs)
    assert "checkpointing: peak" in result.stdout.splitlines()[-1]


def test_benchmark_prefetch_reads_the_time_per_step_from_the_log():
    import benchmark_prefetch

    log = ("[2026-12-03 10:00:00,000][transformer][INFO] - tokenizer: loaded\n"
           "[2026-12-03 10:00:05,000][transformer][INFO] - step 10 | loss 7.1 | lr 1e-4\n"
           "[2026-12-03 10:00:17,500][transformer][INFO] - step 20 | loss 6.0 | lr 2e-4\n"
           "[2026-12-03 10:00:35,000][transformer][INFO] - step 30 | loss 5.5 | lr 3e-4\n"
           "[2026-12-03 10:00:36,000][transformer][INFO] - step 30 | val/loss 5.0\n")
    assert benchmark_prefetch.seconds_per_step(log) == pytest.approx(30.0 / 20)
    with pytest.raises(SystemExit, match="fewer than two logged steps"):
        benchmark_prefetch.seconds_per_step(log.splitlines()[1])
