#!/usr/bin/env bash
# The GPU check in one call (at most about 8 minutes). Stages, chosen by STAGES (default
# "tests eager compiled"):
#   tests     the gpu-marked tests (FSDP2 with NCCL, activation checkpointing's peak memory, ...)
#   eager     the gpu-base benchmark eager (lever ablations, peers, beam search)
#   compiled  the same compiled; a short table over both benchmark runs comes last
#   ddp       tokens/s of plain training against torchrun DDP (NCCL, world size 1)
#   recompute peak CUDA memory and step time of the model=base step with and without
#             activation checkpointing (scripts/activation_memory.py)
#   recipe    scripts/search_multi30k.py: the Multi30k recipe alone (its training time),
#             the other candidates side by side, val scores, then the winners' test sets
# Full logs and JSON go to $OUT (default /tmp/gpu_out). On the lent GPU machine, run from
# the repository root:
#
#   bash .gpu/setup.sh && export PYTHONPATH=/tmp/site:$PWD && bash scripts/gpu_check.sh
#   STAGES="ddp recipe" bash scripts/gpu_check.sh
#
# Each stage has its own time limit, so that a slow compilation cannot eat the others;
# the benchmark writes its JSON as results come in, so a stage cut short keeps them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-gpu-base}  # PRESET=tiny: a dry run of this script anywhere
STAGES=${STAGES:-tests eager compiled}
DDP_ARGS=${DDP_ARGS:-model=base data.max_tokens=8192 trainer.max_steps=300}
RECOMPUTE_ARGS=${RECOMPUTE_ARGS:---batch-size 256 --length 64 --vocab 32000 --steps 5}
RECIPE_ARGS=${RECIPE_ARGS:---solo recipe --concurrency 6 --deadline-s 330 --candidates recipe,en_de:lr2e-3,vocab8k,en_de:drop0.2,d256}
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

wants() { [[ " $STAGES " == *" $1 "* ]]; }

# GPU tests (exit code 5, no test collected, is fine)
if wants tests; then
  stage tests 60 "$PYTHON" -m pytest -q -m gpu tests
  tail -n 3 "$OUT/tests.log"
fi

# DDP against plain training: the same run, logged tokens/s after the first interval
if wants ddp; then
  train_args=(experiment=multi30k_en_de $DDP_ARGS trainer.val_every_steps=100000
              trainer.save_every_steps=100000 trainer.log_every_steps=50 logger.tensorboard=false)
  stage plain 120 "$PYTHON" train.py "${train_args[@]}" hydra.run.dir="$OUT/runs/plain"
  stage ddp 120 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
    "${train_args[@]}" hydra.run.dir="$OUT/runs/ddp"
  for name in plain ddp; do  # the mean of the logged tok/s, the first interval left out
    grep -o 'tok/s [0-9]*' "$OUT/$name.log" | tail -n +2 | awk -v n=$name \
      '{s += $2; k++} END {if (k) printf "%-6s %d intervals, mean %.0f target tok/s\n", n, k, s/k}'
  done | tee "$OUT/ddp.txt"
fi

# Activation checkpointing: peak CUDA memory and step time of the base step, both settings
if wants recompute; then
  stage recompute 240 "$PYTHON" scripts/activation_memory.py --device cuda $RECOMPUTE_ARGS \
    --json "$OUT/recompute.json"
  tail -n 5 "$OUT/recompute.log" | tee "$OUT/recompute.txt"
fi

# The Multi30k recipe search (scripts/search_multi30k.py)
if wants recipe; then
  stage recipe 470 "$PYTHON" scripts/search_multi30k.py --out "$OUT/search" $RECIPE_ARGS
  tail -n 20 "$OUT/recipe.log"
fi

if ! wants eager && ! wants compiled; then
  cat "$OUT/stages.txt"
  exit 0
fi

# eager: ours, each lever switched off in turn, the peers; beam search against generate()
wants eager && stage eager 120 "$PYTHON" scripts/benchmark.py --preset "$PRESET" --decode \
  --systems ours,ours-chunked-loss,ours-sync,ours-separate-qkv,ours-foreach-adamw,torch,marian \
  --json "$OUT/eager.json"

# torch.compile for every system (ours compiles forward, loss and backward together;
#    ours-cudagraphs adds CUDA graphs; ours-plain-loss lets inductor fuse the plain loss
#    instead of the chunked one), in order of importance: results are saved as they come
wants compiled && stage compiled 240 "$PYTHON" scripts/benchmark.py --preset "$PRESET" --compile \
  --systems ours,torch,marian,ours-cudagraphs,ours-plain-loss --json "$OUT/compiled.json"

# the short table over both runs, last
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
