#!/usr/bin/env bash
# The GPU check in one call (at most about 8 minutes): the gpu-marked tests, then the
# gpu-base benchmark eager (with the lever ablations and beam search), then compiled; a
# short table over both runs comes last. Full logs and JSON go to $OUT (default
# /tmp/gpu_out). On the lent GPU machine, run from the repository root:
#
#   bash .gpu/setup.sh && export PYTHONPATH=/tmp/site:$PWD && bash scripts/gpu_check.sh
#
# Each stage has its own time limit, so that a slow compilation cannot eat the others;
# the benchmark writes its JSON as results come in, so a stage cut short keeps them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-gpu-base}  # PRESET=tiny: a dry run of this script anywhere
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null && [ -f .gpu/setup.sh ]; then
  bash .gpu/setup.sh && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/stages.txt"
  return 0
}

# 1. GPU tests (exit code 5, no test collected, is fine)
stage tests 60 "$PYTHON" -m pytest -q -m gpu tests
tail -n 3 "$OUT/tests.log"

# 2. eager: ours, each lever switched off in turn, the peers; beam search against generate()
stage eager 120 "$PYTHON" scripts/benchmark.py --preset "$PRESET" --decode \
  --systems ours,ours-chunked-loss,ours-sync,ours-separate-qkv,ours-foreach-adamw,torch,marian \
  --json "$OUT/eager.json"

# 3. torch.compile for every system (ours compiles forward, loss and backward together;
#    ours-cudagraphs adds CUDA graphs; ours-plain-loss lets inductor fuse the plain loss
#    instead of the chunked one), in order of importance: results are saved as they come
stage compiled 240 "$PYTHON" scripts/benchmark.py --preset "$PRESET" --compile \
  --systems ours,torch,marian,ours-cudagraphs,ours-plain-loss --json "$OUT/compiled.json"

# 4. the short table over both runs, last
echo
cat "$OUT/stages.txt"
files=()
for f in "$OUT/eager.json" "$OUT/compiled.json"; do [ -s "$f" ] && files+=("$f"); done
if [ ${#files[@]} -gt 0 ]; then
  "$PYTHON" scripts/benchmark.py --summarize "${files[@]}" | tee "$OUT/summary.txt"
else
  echo "no benchmark results; see $OUT/eager.log and $OUT/compiled.log"
  tail -n 20 "$OUT/eager.log"
fi
