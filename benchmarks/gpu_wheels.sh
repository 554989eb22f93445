#!/usr/bin/env bash
# Prepare, on this machine, the wheels a lent GPU machine lacks (it has torch, numpy, pandas, pyarrow,
# onnx, onnxruntime; Python 3.12, x86-64): small pure-Python/manylinux wheels into .whl/ (one carry),
# and optionally DALI's CUDA 13 stack split into <= 60 MB parts under .whl-dali/ (one carry per part,
# over consecutive calls to a warm machine). Both folders are git-ignored through .git/info/exclude.
#
#   bash benchmarks/gpu_wheels.sh            # .whl/ only (the GPU check then measures without DALI)
#   bash benchmarks/gpu_wheels.sh --dali     # also .whl-dali/part-*  (see README "GPU check")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.whl-dali/' .git/info/exclude 2>/dev/null || echo '/.whl-dali/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
download() {  # DEST SPEC...
  local dest=$1; shift
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "$@"
}
rm -rf .whl && mkdir -p .whl
# what the project imports on the GPU path and the tests need, beyond the machine's own packages
download .whl pyyaml xxhash tqdm pillow pytest pluggy iniconfig pytest-timeout submitit cloudpickle \
  typing-extensions
echo "wheels for the GPU machine: $(du -sh .whl | cut -f1) in .whl/"
if [[ ${1:-} == --dali ]]; then
  rm -rf .whl-dali && mkdir -p .whl-dali/wheels
  download .whl-dali/wheels nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 \
    astunparse gast libcst makefun nvtx optree six
  tar -C .whl-dali -cf .whl-dali/dali.tar wheels && rm -r .whl-dali/wheels
  split -b 60m -d .whl-dali/dali.tar .whl-dali/part- && rm .whl-dali/dali.tar
  ls -la .whl-dali
fi
