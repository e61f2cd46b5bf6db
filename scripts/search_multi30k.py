"""Choose the Multi30k recipe on the val split, then score the winner on the test sets once.

    python scripts/search_multi30k.py --out runs/search --concurrency 4 --deadline-s 420

Trains every candidate of ``CANDIDATES`` (overrides on top of ``experiment=multi30k_en_de``
or ``multi30k_de_en``) as its own ``train.py`` process, several at a time (small models
leave a GPU mostly idle), scores each finished run on val as its ``test.*`` settings say
(the average of the newest checkpoints, beam 5) with each length penalty of
``--lenpens``, picks the best val lowercased BLEU per direction and only then translates
that run's test sets. Runs still training at the deadline are stopped and reported.
Writes ``<out>/summary.json`` and prints a table. ``--solo NAME`` trains that candidate
first, alone on the machine (its wall time is the recipe's training time there);
``--only NAME`` trains nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = ("en_de", "de_en")
# name -> overrides of the experiment file; "recipe" is the experiment file as it is.
CANDIDATES = {
    "recipe": [],
    "lr2e-3": ["optim.lr=2e-3"],
    "lr1e-3": ["optim.lr=1e-3"],
    "prenorm": ["model.norm_first=true"],
    "drop0.1": ["model.dropout=0.1"],
    "prenorm-drop0.1": ["model.norm_first=true", "model.dropout=0.1"],
    "lr2e-3-drop0.1": ["optim.lr=2e-3", "model.dropout=0.1"],
    "vocab8k": ["data.vocab_size=8000"],
    "vocab2k": ["data.vocab_size=2000"],
    "drop0.2": ["model.dropout=0.2"],
    "d256": ["model.d_model=256", "model.d_ff=512", "model.n_encoder_layers=3",
             "model.n_decoder_layers=3"],
}
TESTS = ("test_2016_flickr", "test_2017_flickr")


@dataclass
class Trial:
    direction: str
    name: str
    overrides: list[str]
    run_dir: Path
    status: str = "waiting"  # waiting | training | done | failed | stopped
    train_s: float | None = None
    val: dict[str, dict] = field(default_factory=dict)  # lenpen -> val scores
    test: dict[str, dict] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.direction}/{self.name}"

    def best_val(self) -> tuple[float, str] | None:
        scored = [(scores["bleu_lc"], lenpen) for lenpen, scores in self.val.items()
                  if "bleu_lc" in scores]
        return max(scored) if scored else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/search"))
    parser.add_argument("--directions", default=",".join(DIRECTIONS))
    parser.add_argument("--candidates", default=",".join(CANDIDATES),
                        help="names of CANDIDATES; DIRECTION:NAME for one direction only")
    parser.add_argument("--only", help="train this one candidate alone (timing)")
    parser.add_argument("--solo", default="",
                        help="candidates trained one at a time first, alone on the machine")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--deadline-s", type=float, default=420.0,
                        help="stop runs still training after this many seconds")
    parser.add_argument("--lenpens", default="0.6,1.0")
    parser.add_argument("--no-test", action="store_true", help="val only")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args()
    # The runs start in the repository root: relative paths name places under this folder.
    args.out = args.out.absolute()
    if os.environ.get("MULTI30K_DIR"):
        os.environ["MULTI30K_DIR"] = os.path.abspath(os.environ["MULTI30K_DIR"])
    names = [args.only] if args.only else args.candidates.split(",")
    trials = make_trials(args.directions.split(","), names, args.overrides, args.out)
    start = time.monotonic()
    solo = [t for t in trials if t.name in args.solo.split(",")]
    train_all(solo, 1, start + args.deadline_s)  # alone on the machine: its training time
    train_all([t for t in trials if t not in solo], args.concurrency, start + args.deadline_s)
    jobs = [(t, lenpen) for t in trials if t.status == "done" for lenpen in args.lenpens.split(",")]
    with ThreadPoolExecutor(args.concurrency) as pool:  # each job is its own process
        scores = pool.map(lambda job: score(job[0], ["val"], job[1])["val"], jobs)
        for (trial, lenpen), val in zip(jobs, scores, strict=True):
            trial.val[lenpen] = val
    winners = {}
    for direction in args.directions.split(","):
        scored = [(t.best_val(), t) for t in trials if t.direction == direction and t.best_val()]
        if scored:
            (_, lenpen), winner = max(scored, key=lambda pair: pair[0])
            winners[direction] = winner.name
            if not args.no_test:
                winner.test = score(winner, list(TESTS), lenpen)
    report(trials, winners, args.out, time.monotonic() - start)
    return 0


def make_trials(directions: list[str], names: list[str], overrides: list[str], out: Path
                ) -> list[Trial]:
    """A trial per direction and candidate name; ``DIRECTION:NAME`` for one direction."""
    trials = []
    for direction in directions:
        for entry in names:
            only, _, name = entry.rpartition(":")
            if name not in CANDIDATES:
                raise SystemExit(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")
            if only in ("", direction):
                trials.append(Trial(direction, name, CANDIDATES[name] + overrides,
                                    out / f"{direction}-{name}"))
    return trials


def train_all(trials: list[Trial], concurrency: int, deadline: float) -> None:
    """Run the trials' training, ``concurrency`` at a time, until done or the deadline."""
    waiting, running = list(trials), {}
    while waiting or running:
        while waiting and len(running) < concurrency and time.monotonic() < deadline:
            trial = waiting.pop(0)
            running[trial.label] = (trial, launch(trial), time.monotonic())
        for label, (trial, process, started) in list(running.items()):
            if process.poll() is not None:
                trial.train_s = time.monotonic() - started
                trial.status = "done" if process.returncode == 0 else "failed"
                print(f"{label}: {trial.status} in {trial.train_s:.0f} s", flush=True)
                del running[label]
            elif time.monotonic() > deadline:
                process.terminate()  # the trainer checkpoints and exits at SIGTERM
                process.wait()
                trial.status = "stopped"
                del running[label]
        if time.monotonic() > deadline:
            for trial in waiting:
                trial.status = "stopped"
            waiting = []
        time.sleep(1.0)


def launch(trial: Trial) -> subprocess.Popen:
    trial.status = "training"
    trial.run_dir.mkdir(parents=True, exist_ok=True)
    log = open(trial.run_dir / "stdout.log", "w")  # noqa: SIM115 (closed with the process)
    command = [sys.executable, str(ROOT / "train.py"), f"experiment=multi30k_{trial.direction}",
               *trial.overrides, f"hydra.run.dir={trial.run_dir}", "logger.attention_maps=false"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def score(trial: Trial, splits: list[str], lenpen: str) -> dict[str, dict]:
    """evaluate.py on ``splits`` with the run's averaging and beam; {split: scores}."""
    out = trial.run_dir / f"eval-{'-'.join(splits)}-lenpen{lenpen}"
    out.mkdir(parents=True, exist_ok=True)
    config = read_test_settings(trial.run_dir)
    command = [sys.executable, str(ROOT / "evaluate.py"), f"checkpoint={trial.run_dir}",
               f"average_last={config['average_last']}", f"beam={config['beam']}",
               f"lenpen={lenpen}", f"splits=[{','.join(splits)}]", f"output_dir={out}",
               f"scores_file={out / 'scores.json'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        print(f"{trial.label}: evaluate failed:\n{result.stderr[-2000:]}", flush=True)
        return {split: {} for split in splits}
    scores = json.loads((out / "scores.json").read_text())
    return {name.split(".")[0]: value for name, value in scores.items()}


def read_test_settings(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml").test)


def report(trials: list[Trial], winners: dict[str, str], out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {"winners": winners, "seconds": seconds,
               "trials": [{**asdict(t), "run_dir": str(t.run_dir)} for t in trials]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'run':<22}{'status':<9}{'train s':>8}  val BLEU lc by lenpen   test BLEU/lc")
    for t in trials:
        val = " ".join(f"{lp}:{s.get('bleu_lc', float('nan')):.2f}" for lp, s in t.val.items())
        test = " ".join(f"{split[5:]}:{s.get('bleu', float('nan')):.2f}/"
                        f"{s.get('bleu_lc', float('nan')):.2f}" for split, s in t.test.items())
        mark = "*" if winners.get(t.direction) == t.name else " "
        train_s = f"{t.train_s:.0f}" if t.train_s else "-"
        print(f"{mark}{t.label:<21}{t.status:<9}{train_s:>8}  {val:<24}{test}")
    print(f"total {seconds:.0f} s; summary in {out / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
