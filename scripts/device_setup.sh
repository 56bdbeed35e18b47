#!/usr/bin/env bash
# The benchmark device has torch, Triton and CUDA but no pydantic and no internet: carry wheels in
# .whl/ (ignored by git) and install them there.
#   bash scripts/device_setup.sh download   # here: pydantic's wheels for the device's Python 3.12, gemlite
#   source scripts/device_setup.sh          # on the device, from the repository root (carry .whl)
# Sourced, it makes tqc importable without pip install, keeps the tuning cache under $OUT/cache
# (seeded from .whl/cache/*.json, e.g. a previous run's cache), and records the GPU and versions.
if [ "${1:-}" = "download" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 \
    typing-inspection==0.4.2 typing-extensions==4.15.0
  python3 -m pip wheel -q --no-deps gemlite==0.6.0.post2 -w .whl   # pure Python and Triton
  exit
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
ln -sfn ../kernels tqc/kernels
ln -sfn ../calibration tqc/calibration
export TQC_KERNEL_CACHE=${OUT:-/tmp/out}/cache
mkdir -p "$TQC_KERNEL_CACHE"
cp .whl/cache/*.json "$TQC_KERNEL_CACHE"/ 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv > "${OUT:-/tmp/out}/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "${OUT:-/tmp/out}/gpu.txt"
