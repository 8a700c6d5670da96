#!/usr/bin/env bash
# The GPU measurement in one call on a lent GPU machine: train_throughput.py for a ~1.3B GPT-2
# shape (24 layers, d_model 2048, 16 heads, d_ff 8192, seq 2048, vocab 50304), bf16 compute with
# fp32 parameters, one GPU, in three variants (cuDNN attention; XLA attention with remat;
# cuDNN at twice the batch with remat). Results (JSON + logs) go to $1 (default $OUT).
#
#   bash benchmarks/gpu_run.sh "$OUT"
#
# The GPU image has jax, flax and optax but not ml_collections: carry its wheel in .whl/
# (python3 -m pip download --no-deps -d .whl ml_collections==1.1.0, .whl/ git-ignored).
# SHAPE overrides the model flags and PYTHON the interpreter, e.g. SHAPE=--tiny
# PYTHON=.venv/bin/python to try the script on a CPU (where the cuDNN runs fail).
set -uo pipefail
py=${PYTHON:-python3}
out=${1:-${OUT:?give an output folder}}
mkdir -p "$out"
if ! "$py" -c "import ml_collections" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/site .whl/ml_collections-*.whl \
    || { echo "ml_collections missing and no wheel in .whl/" >&2; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv" 2>&1
shape=${SHAPE:---preset=gpt2 --d_model=2048 --n_layers=24 --n_heads=16 --d_ff=8192 --seq_len=2048 --vocab=50304}
run() {
  local name=$1; shift
  echo "== $name: $*"
  # shellcheck disable=SC2086
  timeout "${RUN_TIMEOUT:-170}" "$py" benchmarks/train_throughput.py $shape --dtype=bfloat16 \
    --matmul_n=8192 --steps=6 --warmup=2 "$@" --json="$out/$name.json" >"$out/$name.log" 2>&1
  echo "exit $?"; grep -E "tokens/s|llmjax|ceilings|compile" "$out/$name.log" | tail -4
}
run cudnn_b8 --attention_impl=cudnn --batch=8
run xla_b8_dots_no_batch --attention_impl=xla --batch=8 --remat=dots_no_batch
run cudnn_b16_dots_no_batch --attention_impl=cudnn --batch=16 --remat=dots_no_batch
