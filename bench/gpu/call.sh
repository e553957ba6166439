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
#
# One part per call: each ends within about 9.5 minutes (its steps' limits, installs and a 20 s grace per
# step included); a 30-minute lease holds three, so run them in order of need (train, decode, study; suite
# where time is left) and send the next call within the 30 s a machine stays warm (it keeps its compile cache).
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

if [ "$smoke" = 1 ]; then
  TRAIN=(--configs tiny_baseline tiny --device cpu --rounds 3 --steps-per-round 1 --warmup 1 --batch-size 2)
  DECODE=(--configs tiny --device cpu --batch-sizes 1 --modes eager --n-tokens 4 --repeats 2 --engines torch)
  COMPRESSED=(--device cpu --rounds 3 --n-tokens 2 --batch-sizes 1 --context 16)
  SUITE=(tests/test_bench.py)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  STUDY=$work/study_smoke.toml
  cat >"$STUDY" <<EOF
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
EOF
  results=$work/results
else
  TRAIN=()
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
  *)
    echo "unknown part $part: use train, decode, suite or study" >&2
    exit 2
    ;;
  esac
done
grep -A99 '^steps:' "$out/steps.txt"
