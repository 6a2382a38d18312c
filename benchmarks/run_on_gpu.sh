#!/usr/bin/env bash
# One call on a lent GPU machine (Python 3.12, torch 2.11, no diffusers): install the carried
# wheels (.whl/: diffusers, importlib_metadata), build featinv with its C++ extensions, run the GPU
# benchmark, then the GPU tests (fast path, Triton kernels, sampler loops): the benchmark first, so
# that a call cut short keeps its timings, and alone on the GPU. With FINETUNE=1 the
# shipped demo's spatial ControlNet is fine-tuned on the GPU first (the benchmark waits for it to end).
# COMPILED_BATCHES (default 16): batch sizes for the torch.compile reduce-overhead rows; TWIN_BATCHES
# (default 1; empty: none): for the fast path with the twin encoder; AUTOTUNE_BATCHES (default none): for a
# max-autotune fast path (minutes of autotuning each); BATCHES (default "1 16"): the batch sizes.
# WEBAPP=1: afterwards, the web app's latency (benchmarks/bench_webapp.py, eager against fast; WEBAPP_TIMEOUT
# 150 s: give the call room for it, e.g. BENCH_TIMEOUT=240). The machine has no FastAPI: carry its wheels
# for Python 3.12 in .whl/web/ (pip download --only-binary=:all: --python-version 3.12 --platform
# manylinux2014_x86_64 -d .whl/web fastapi uvicorn python-multipart, pinned as in .venv).
# CLIENTS=N: afterwards (needs the same wheels), N users at once against featinv serve on the GPU, with and
# without cross-client batching (bench_webapp.py --clients N; CLIENTS_TIMEOUT 150 s).
# Timeouts: BENCH_TIMEOUT 380 s, TEST_TIMEOUT 120 s (with the build, a call of timeout_s 600 holds both).
# Results go to $OUT (or ./gpu-out): run.log, bench_gpu.json, and the fine-tune's outputs.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH=/opt/gcc/bin:$PATH
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
exec > >(tee -a "$OUT/run.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, 'triton', triton.__version__)"
FT_PID=
if [ "${FINETUNE:-0}" = 1 ]; then
  stamp "fine-tune started"
  python3 -c "import sys; from featinv.cli import main; sys.exit(main(sys.argv[1:]))" train \
    --model featinv/pretrained/shapes-demo --data shapes --pool 50000 --seed 4 --steps "${FT_STEPS:-2500}" \
    --batch-size 256 --lr 2e-4 --ema 0.999 --checkpoint-every 1000 --time-budget "${FT_BUDGET:-260}" \
    --device cuda --out /tmp/ft > /tmp/ft.log 2>&1 &
  FT_PID=$!
  (while kill -0 "$FT_PID" 2>/dev/null; do sleep 2; done; stamp "fine-tune ended"; tail -c 1200 /tmp/ft.log
   mkdir -p "$OUT/ft" && cp /tmp/ft/model/controlnet/* "$OUT/ft/" && cp /tmp/ft/train_log.jsonl "$OUT/ft_train_log.jsonl") &
  WATCH_PID=$!
fi
stamp "build"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -c "import featinv._C, featinv._sampler; print('featinv._C and featinv._sampler built')"
python3 -c "from featinv.engine.graph_loop import native_graph_loop; print('graph loop', native_graph_loop('cpp'))"
stamp "benchmark"
timeout "${BENCH_TIMEOUT:-380}" python3 benchmarks/bench_gpu.py --profile --batches ${BATCHES:-1 16} --compiled-batches ${COMPILED_BATCHES:-16} \
  --twin-batches ${TWIN_BATCHES-1} --autotune-batches ${AUTOTUNE_BATCHES:-} --out "$OUT/bench_gpu.json" ${FT_PID:+--wait-pid $FT_PID}
stamp "benchmark done; GPU tests"
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_fast_path.py tests/test_fast_pieces.py \
  tests/test_kernels.py tests/test_bench_gpu.py tests/test_twin_encoder.py::test_the_captured_twin_step_equals_the_eager_loop_on_the_gpu \
  > "$OUT/pytest.log" 2>&1
stamp "GPU tests ended"; tail -25 "$OUT/pytest.log"
if [ "${WEBAPP:-0}" = 1 ]; then
  stamp "web app latency"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-web .whl/web/*.whl
  PYTHONPATH=$PYTHONPATH:/tmp/site-web timeout "${WEBAPP_TIMEOUT:-150}" python3 benchmarks/bench_webapp.py --backends eager fast --device cuda \
    --out "$OUT/bench_webapp.json"
fi
if [ "${CLIENTS:-0}" != 0 ]; then
  stamp "web app, $CLIENTS concurrent clients, batched vs unbatched"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-web .whl/web/*.whl
  PYTHONPATH=$PYTHONPATH:/tmp/site-web timeout "${CLIENTS_TIMEOUT:-150}" python3 benchmarks/bench_webapp.py \
    --clients "$CLIENTS" --moves 3 --device cuda --out "$OUT/bench_webapp_clients.json"
fi
[ -n "$FT_PID" ] && wait "$WATCH_PID"
stamp "done"
