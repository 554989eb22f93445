#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (an H200 here): everything it measures goes to OUT_DIR,
# and it ends inside 8 minutes (GPU_CHECK_BUDGET_S, default 470 s: each part's time limit is cut to
# what is left, and a part that no longer fits is skipped and named in summary.json). Run from the
# repository root:
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]   # here, without a GPU: see below
#
# It installs the wheels carried in .whl/ (benchmarks/gpu_wheels.sh) and, when every part of DALI's
# CUDA 13 stack has been carried to /tmp/dali-parts (or .whl-dali/), DALI too; without DALI it
# measures what needs none and says so in summary.json. Parts, in this order, each a few minutes at most:
#   1 environment (nvidia-smi, torch, CUDA, NCCL)            env.txt
#   2 the perf levers side by side (benchmarks/step_profile.py): iResNet-50, 256 + 256, bf16, each
#     variant's images/s, TFLOP/s and MFU with a profiler summary (top kernels, memory-bound
#     share): NCHW as before the switches, channels-last, + fused SGD, + torch.compile of the
#     backbone                                              levers.jsonl / levers.json / levers.log,
#                                                            traces/VARIANT.json.gz
#   3 train step: iResNet-50, 256 + 256, bf16, MFU           train_step.json / .log
#   4 the DALI graph on the GPU (when DALI is there)         dali_pipeline.json / .log
#   5 the objective with 2 NCCL processes on this one GPU    nccl_objective.txt
#   6 the GPU tests (pytest -m gpu), values against the CPU  gpu_tests.txt
# GPU_CHECK_PARTS="levers train_step" runs only those parts (the packages are installed either way):
# a call that carries one of DALI's parts can measure what needs no DALI meanwhile. LEVER_VARIANTS
# overrides part 2's variants (benchmarks/step_profile.py --help lists them).
#
# --dry-run exercises the script here without a GPU: no packages, no nvidia-smi, parts 3-6 skipped
# (they need CUDA), and part 2 runs benchmarks/step_profile.py on the CPU with iresnet_mini at
# 2 + 2 images and the eager variants (torch.compile's CPU build takes minutes: the dry run leaves
# it out, tests/unit/test_perf_levers.py checks it); summary.json says what was skipped and why.
set -u
dry_run=false
if [[ ${1:-} == --dry-run ]]; then dry_run=true; shift; fi
if $dry_run; then
  wanted=" levers "
  out=${1:-$(mktemp -d /tmp/gpu-check-dry-XXXXXX)}
else
  wanted=" ${GPU_CHECK_PARTS:-levers train_step dali_pipeline nccl_objective gpu_tests} "
  out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR (or --dry-run [OUT_DIR] without a GPU)}
fi
want() { [[ $wanted == *" $1 "* ]]; }
budget=${GPU_CHECK_BUDGET_S:-470}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
$dry_run && [[ -x .venv/bin/python && $PY == python3 ]] && PY=.venv/bin/python
summary=()
skipped=()
note() { echo "[gpu_check] $*" | tee -a "$out/summary.txt"; }
skip() {  # NAME REASON
  note "$1: skipped, $2"
  skipped+=("\"$1\": \"$2\"")
}
part() {  # NAME LIMIT_S LOG COMMAND... : run one part into LOG within min(LIMIT_S, the budget left)
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((budget - SECONDS))
  if ((left < 30)); then skip "$name" "the ${budget} s budget is spent"; return; fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  note "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)"
  summary+=("\"$name\": {\"exit\": $rc, \"seconds\": $((SECONDS - start)), \"limit\": $limit}")
}

# 1 environment and packages
if $dry_run; then
  skip environment "dry run: no GPU, nothing installed"
  dali=false
else
  { nvidia-smi; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "nccl", torch.cuda.nccl.version(), torch.cuda.get_device_name(0))'; } > "$out/env.txt" 2>&1
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  parts_dir=/tmp/dali-parts
  [[ -d .whl-dali ]] && mkdir -p "$parts_dir" && cp -n .whl-dali/part-* "$parts_dir"/ 2>/dev/null
  if compgen -G "$parts_dir/part-*" > /dev/null; then
    if cat "$parts_dir"/part-* | tar -C /tmp -xf - 2>/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/wheels/*.whl
    else
      note "DALI parts in $parts_dir are incomplete: measuring without DALI"
    fi
  fi
  if "$PY" -c 'import nvidia.dali' 2> /dev/null; then dali=true; else dali=false; fi
  note "DALI available: $dali"
fi

# 2 the perf levers side by side
if want levers; then
  if $dry_run; then
    lever_args=(--device cpu --backbone iresnet_mini --embedding 32 --classes 40 --fr-batch 2 --reg-batch 2
      --warmup 1 --steps 1 --variants "${LEVER_VARIANTS:-nchw,channels_last,channels_last+foreach}")
    note "levers: dry run on the CPU (iresnet_mini, 2 + 2 images, eager variants only): not a measurement"
  else
    lever_args=(--device cuda --backbone iresnet50 --fr-batch 256 --reg-batch 256 --fp16 --warmup 3 --steps 10
      --variants "${LEVER_VARIANTS:-nchw+foreach,channels_last+foreach,channels_last+fused,channels_last+fused+compile}")
  fi
  part levers 300 "$out/levers.log" "$PY" benchmarks/step_profile.py "${lever_args[@]}" --trace-dir "$out/traces"
  grep '^{"variant"' "$out/levers.log" > "$out/levers.jsonl"
  tail -n 1 "$out/levers.log" | grep '^{"bench"' > "$out/levers.json"
fi

if $dry_run; then
  for name in train_step dali_pipeline nccl_objective gpu_tests; do skip "$name" "dry run: needs CUDA"; done
  wanted=" "
fi

# 3 the training step (DALI-fed when DALI is there, else on synthetic device tensors)
if want train_step; then
  part train_step 150 "$out/train_step.log" "$PY" benchmarks/train_step.py --gpu-only --gpu-steps 20
  tail -n 1 "$out/train_step.log" > "$out/train_step.json"
fi

# 4 the DALI graph on the GPU
if ! want dali_pipeline; then
  :
elif $dali; then
  part dali_pipeline 90 "$out/dali_pipeline.log" "$PY" benchmarks/dali_pipeline.py --device gpu
  tail -n 1 "$out/dali_pipeline.log" > "$out/dali_pipeline.json"
else
  note "dali_pipeline: skipped, DALI is not installed on this machine"
fi

# 5 two NCCL ranks on one GPU: NCCL refuses two ranks on one device ("Duplicate GPU detected")
#   unless each rank gets its own device; the script records what this NCCL does
want nccl_objective && part nccl_objective 60 "$out/nccl_objective.txt" "$PY" benchmarks/nccl_objective.py

# 6 the GPU tests (CPU values computed in the same process)
want gpu_tests && part gpu_tests 240 "$out/gpu_tests.txt" "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
  --continue-on-collection-errors tests

{
  printf '{"dry_run": %s, "dali": %s, "budget_s": %s, "seconds": %s' "$dry_run" "$dali" "$budget" "$SECONDS"
  for s in "${summary[@]}"; do printf ', %s' "$s"; done
  printf ', "skipped": {'; (IFS=,; printf '%s' "${skipped[*]}"); printf '}'
  echo '}'
} > "$out/summary.json"
cat "$out/summary.json"
