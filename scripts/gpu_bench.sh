#!/usr/bin/env bash
# Issue 12's speed measurements on one GPU machine that has no network, in two steps.
#
# 1. Here (network to PyPI, a copy of bytedance/1d-tokenizer at hand: a checkout or its bare git directory):
#        bash scripts/gpu_bench.sh prepare /path/to/1d-tokenizer
#    puts into git-ignored folders what the GPU machine lacks: .whl/ (hydra, omegaconf, webdataset, ... wheels,
#    ../shared/device/fetch_wheels.sh), .ref/ (the reference's code and configs), .device/bench/
#    (../shared/bench/bench_reference.py and reference_h200.json: ../shared does not travel).
# 2. On the GPU machine, carrying .whl .ref .device/bench, ONE call (device time is short; timeout_s 600):
#        bash scripts/gpu_bench.sh run all      # the CUDA-only tests, then every row, the teacher and train.py runs
#    `run all` first runs the tests that skip on a CPU (CUDA-graph samplers equal eager ones, 16-mixed steps with no
#    host synchronisation, load_from_checkpoint onto cuda; at most 120 s), then scripts/benchmark.py with --profile
#    and --budget-s: whatever no longer fits
#    BENCH_BUDGET_S (default 540 s from the start of `run all`; rows cheapest first) is skipped by name. The parts
#    on their own, for a longer lease:
#        bash scripts/gpu_bench.sh run rows     # every row of issue 12's table, both implementations, one process
#        bash scripts/gpu_bench.sh run train    # train.py titok_b64, titok_b64_stage2, rar_b, maskgit_titok_l32
#        bash scripts/gpu_bench.sh run precision  # does bf16-mixed train titok_b64 as its 16-mixed does? (~6 min)
#    Output: $OUT/bench_<part>.log and $OUT/bench_<part>.json ($OUT unset: .device/bench_out).
#    Extra arguments go to scripts/benchmark.py (e.g. --rows RAR-B --iters 10). Each part prints its seconds, to
#    replace the estimates in benchmark.py's ESTIMATE_S (rows ~1-2 min each with our compilation, train runs ~2).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command=${1:-}
shift || true

case "$command" in
prepare)
  source=${1:?usage: gpu_bench.sh prepare <1d-tokenizer checkout or git directory>}
  bash ../shared/device/fetch_wheels.sh
  rm -rf .ref && mkdir -p .ref .device/bench
  paths="configs modeling utils data evaluator demo_util.py imagenet_classes.py"
  if [ -d "$source/modeling" ]; then
    for p in $paths; do cp -r "$source/$p" .ref/; done
  else  # a bare repository (e.g. a mirror): its HEAD
    git --git-dir="$source" archive HEAD $paths | tar -x -C .ref
  fi
  cp ../shared/bench/bench_reference.py ../shared/bench/reference_h200.json .device/bench/
  du -sh .whl .ref .device/bench
  echo "now run on the GPU machine, carrying .whl .ref .device/bench:  bash scripts/gpu_bench.sh run rows"
  ;;
run)
  part=${1:?usage: gpu_bench.sh run all|rows|train|precision [benchmark.py arguments]}
  shift
  out=${OUT:-$root/.device/bench_out}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
  export PYTHONPATH=$root/.site:$root PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/bench_$part.log"
  case "$part" in
  all)
    budget=${BENCH_BUDGET_S:-540}
    status=0
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_sampling.py tests/test_used_by.py tests/test_train.py \
      -k "cuda or load_from_checkpoint_without" 2>&1 | tee -a "$out/bench_$part.log" || status=$?
    echo "# CUDA-only tests: exit status $status" | tee -a "$out/bench_$part.log"
    args=(--reference .ref --profile --train-steps 150 --workdir .device/bench_train)
    args+=(--budget-s $((budget - SECONDS)))
    ;;
  rows) args=(--reference .ref --no-train-runs --profile) ;;
  train) args=(--rows none --train-steps 150 --workdir .device/bench_train) ;;
  precision) args=(--rows none --no-train-runs --precision-check titok_b64 --workdir .device/bench_train) ;;
  *) echo "unknown part $part (all, rows, train or precision)" >&2; exit 2 ;;
  esac
  python3 scripts/benchmark.py "${args[@]}" --out "$out/bench_$part.json" "$@" 2>&1 | tee -a "$out/bench_$part.log"
  ;;
*)
  sed -n '2,21p' "$0"
  exit 2
  ;;
esac
