#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (an H200 here): everything it measures goes to OUT_DIR,
# and it ends well inside 8 minutes. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# It installs the wheels carried in .whl/ (benchmarks/gpu_wheels.sh) and, when every part of DALI's
# CUDA 13 stack has been carried to /tmp/dali-parts (or .whl-dali/), DALI too; without DALI it
# measures what needs none and says so in summary.json. Parts, each a few minutes at most:
#   1 environment (nvidia-smi, torch, CUDA, NCCL)            env.txt
#   2 the GPU tests (pytest -m gpu), values against the CPU  gpu_tests.txt
#   3 train step: iResNet-50, 256 + 256, bf16, MFU           train_step.json / .log
#   4 the DALI graph on the GPU (when DALI is there)         dali_pipeline.json / .log
#   5 the objective with 2 NCCL processes on this one GPU    nccl_objective.txt
# GPU_CHECK_PARTS="train_step nccl_objective" runs only those parts (the packages are installed
# either way): a call that carries one of DALI's parts can measure what needs no DALI meanwhile.
set -u
wanted=" ${GPU_CHECK_PARTS:-gpu_tests train_step dali_pipeline nccl_objective} "
want() { [[ $wanted == *" $1 "* ]]; }
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
summary=()
note() { echo "[gpu_check] $*" | tee -a "$out/summary.txt"; }
part() {  # NAME LIMIT_S LOG COMMAND... : run one part with a time limit into LOG, record its exit status
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  note "$name: exit $rc in $((SECONDS - start)) s"
  summary+=("\"$name\": {\"exit\": $rc, \"seconds\": $((SECONDS - start))}")
}

# 1 environment and packages
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

# 2 the GPU tests (CPU values computed in the same process)
want gpu_tests && part gpu_tests 240 "$out/gpu_tests.txt" "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
  --continue-on-collection-errors tests

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

{ printf '{"dali": %s' "$dali"; for s in "${summary[@]}"; do printf ', %s' "$s"; done; echo '}'; } \
  > "$out/summary.json"
cat "$out/summary.json"
