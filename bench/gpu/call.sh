#!/usr/bin/env bash
# One call on a lent GPU machine, from the repository root there, with $OUT the folder that comes back:
#
#   GIT_COMMIT=<hash> bash bench/gpu/call.sh PART [PART ...]
#
#   train   bench.train_throughput: baseline and per-head at 5-8 blocks, 16 x 1024, bf16, compile, fused AdamW
#   decode  bench.decode_latency (eager / compile / CUDA graphs, batch 1 and 16, context 512, energy x 3) and
#           bench.compressed_decode (bitsandbytes NF4/int8, torchao int8/int4, 2:4 sparse kernels vs dense),
#           then the bitsandbytes CUDA test
#   suite   the whole test suite, CUDA tests included
#   study   runners/study_100m_lease.toml; its table, report, plots and JSON come back as study.tar.gz
#   lease   the one call of a 15-device-minute lease (start and idle included, so about 9 minutes of work): the
#           100M training step (baseline and per-head at 8 blocks: tokens/s, MFU, compile time), decode latency
#           at batch 1 and 16 per mode (eager, compile, CUDA graphs) with J/token where NVML reads energy, and a
#           study at toy sizes on the GPU (every step of the pipeline once); the most information per minute
#
# One part per call: each ends within about 9.5 minutes (its steps' limits, installs and a 20 s grace per
# step included). With 15 device-minutes in all per session, send `lease` once and give the machine back.
# Carry .whl (train, suite, study) or .whl-kernels (decode): bench/gpu/wheels.sh builds both here. The
# machine's own torch is used. Each step runs under its own time limit (SIGINT, then SIGKILL), so a call ends
# inside the 10 minutes a command has, keeping what finished: the benchmarks write their JSON as they go.
# Under $OUT: steps.txt (device, driver, torch, commit, then each step's exit status and seconds), log.txt (every
# step's output) and each benchmark's JSON: 8 files with all four parts, the most that come back from a call.
# SMOKE=1 runs the same steps on the CPU at toy sizes: a check of this script, not a measurement.
set -uo pipefail
[ $# -ge 1 ] || { echo "name a part: train, decode, suite or study" >&2; exit 2; }
out=${OUT:?set OUT to the folder for the results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
smoke=${SMOKE:-0}

for d in .whl .whl-kernels; do # (a smoke run uses this machine's environment as it is)
  if [ "$smoke" != 1 ] && ls "$d"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$d"/*.whl ||
      { echo "installing the wheels of $d failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
done
if ! command -v bwrap >/dev/null && ls .whl/bubblewrap_*.deb >/dev/null 2>&1; then
  dpkg -x .whl/bubblewrap_*.deb /tmp/bwrap && export PATH=/tmp/bwrap/usr/bin:$PATH  # HumanEval's sandbox
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "bwrap: $(bwrap --version 2>&1 || echo missing)"
  $PY -m pip list 2>/dev/null | grep -iE "^(torch|transformers|huggingface.hub|datasets|pyarrow|numpy|bitsandbytes|torchao|lm.eval|onnxruntime) "
  echo "steps:"
} >"$out/steps.txt" 2>&1
grep -A99 '^steps:' "$out/steps.txt"

# The oldest torch this project runs on (scaled_dot_product_attention's enable_gqa came with 2.5): an older image
# stops here in one line, before any work, rather than at the first forward pass of every step.
$PY - <<'PY' || exit 1
import sys

import torch

have = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if have < (2, 5):
    print(f"torch {torch.__version__} is older than 2.5, the oldest this project runs on: carry a newer torch wheel in "
          ".whl (bench/gpu/wheels.sh) or use an image with torch >= 2.5", file=sys.stderr)
    sys.exit(1)
PY

step() { # step SECONDS NAME COMMAND...: the command under a time limit, its output appended to $out/log.txt
  local limit=$1 name=$2 t0=$SECONDS rc start
  shift 2
  echo "=== $name: $*" >>"$out/log.txt"
  start=$(wc -l <"$out/log.txt")
  timeout --signal=INT --kill-after=20 "$limit" "$@" >>"$out/log.txt" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/steps.txt"
  tail -n +"$((start + 1))" "$out/log.txt" | tail -n 30
}

# A study at toy sizes (every step of the pipeline once): the smoke run's study, and the lease's on the GPU.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
TOY_STUDY=$work/study_smoke.toml
cat >"$TOY_STUDY" <<EOF
name = "study_smoke"
checkpoints_dir = "$work/checkpoints"
logs_dir = "$work/logs"
results_dir = "$work/results"
[[runs]]
runner = "tiny"
name = "a"
args = ["--max-steps", "4", "--batch-size", "2", "--vocab-size", "512", "--eval-interval", "2", "--ckpt-interval", "2"]
[[runs]]
runner = "tiny"
name = "b"
args = ["--no-head-layer", "--n-layers", "3", "--max-steps", "4", "--batch-size", "2", "--vocab-size", "512"]
[[compress]]
base = "a"
name = "a-drop1"
args = ["--method", "drop-last", "--layers", "1"]
[eval]
quality = ["--max-tokens", "2000", "--n-docs", "2", "--humaneval-limit", "2", "--max-new-tokens", "8"]
side_by_side = ["--rounds", "3", "--context", "16", "--prompt-len", "16", "--n-tokens", "2"]
induction = ["--sequences", "4", "--length", "20"]
EOF

if [ "$smoke" = 1 ]; then
  TRAIN=(--configs tiny_baseline tiny --device cpu --rounds 3 --steps-per-round 1 --warmup 1 --batch-size 2)
  LEASE_TRAIN=("${TRAIN[@]}")
  LEASE_DECODE=(--configs tiny --device cpu --batch-sizes 1 2 --modes eager --n-tokens 4 --repeats 2 --engines torch)
  DECODE=(--configs tiny --device cpu --batch-sizes 1 --modes eager --n-tokens 4 --repeats 2 --engines torch)
  COMPRESSED=(--device cpu --rounds 3 --n-tokens 2 --batch-sizes 1 --context 16)
  SUITE=(tests/test_bench.py)
  STUDY=$TOY_STUDY
  results=$work/results
else
  TRAIN=()
  # the lease's share: two 8-block configs, fewer rounds (compilation is timed in the warm-up and recorded)
  LEASE_TRAIN=(--configs baseline_8_layer perhead_8_layer --rounds 4 --steps-per-round 3 --warmup 3)
  LEASE_DECODE=(--configs baseline_8_layer --batch-sizes 1 16 --repeats 5 --energy-runs 1)
  DECODE=()
  COMPRESSED=()
  SUITE=()
  STUDY=runners/study_100m_lease.toml
  results=results
fi

for part in "$@"; do
  case $part in
  train)
    step 540 train_throughput $PY -m bench.train_throughput --out "$out/train_throughput.json" "${TRAIN[@]}"
    ;;
  decode)
    step 280 decode_latency $PY -m bench.decode_latency --out "$out/decode_latency.json" "${DECODE[@]}"
    step 190 compressed_decode $PY -m bench.compressed_decode --out "$out/compressed_decode.json" "${COMPRESSED[@]}"
    step 50 pytest_bnb $PY -m pytest -o addopts=-q -p no:cacheprovider -rA -m cuda -k bitsandbytes tests/test_cuda.py
    ;;
  suite)
    step 520 pytest $PY -m pytest -o addopts=-q -p no:cacheprovider -rfEs "${SUITE[@]}"
    ;;
  study)
    step 530 study $PY -m runners.study "$STUDY"
    name=$($PY -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['name'])" "$STUDY")
    if [ -d "$results/$name" ]; then
      tar -czf "$out/study.tar.gz" -C "$results" --exclude "$name/logs" --exclude "$name/steps" "$name"
      for f in table.md report.md; do [ -f "$results/$name/$f" ] && cp "$results/$name/$f" "$out/study_$f"; done
    fi
    ;;
  lease)
    step 200 train_throughput $PY -m bench.train_throughput --out "$out/train_throughput.json" "${LEASE_TRAIN[@]}"
    step 150 decode_latency $PY -m bench.decode_latency --out "$out/decode_latency.json" "${LEASE_DECODE[@]}"
    step 200 study_smoke $PY -m runners.study "$TOY_STUDY"
    if [ -d "$work/results/study_smoke" ]; then
      tar -czf "$out/study_smoke.tar.gz" -C "$work/results" --exclude study_smoke/logs study_smoke
    fi
    ;;
  *)
    echo "unknown part $part: use train, decode, suite, study or lease" >&2
    exit 2
    ;;
  esac
done
grep -A99 '^steps:' "$out/steps.txt"
