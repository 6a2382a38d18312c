#!/usr/bin/env bash
# One call on a lent GPU machine (Python 3.12, torch 2.11, no diffusers): install the carried
# wheels (.whl/: diffusers, importlib_metadata), build featinv with its C++ extension, run the
# test suite there, then the GPU benchmark. Results go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -c "import featinv._C; print('featinv._C built')" | tee -a "$OUT/gpu.txt"
python3 -c "import torch, featinv._sampler; print('featinv._sampler built')" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt" | tail -15
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.txt"
