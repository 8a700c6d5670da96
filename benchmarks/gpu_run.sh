#!/usr/bin/env bash
# The GPU measurement in one call on a lent GPU machine: train_throughput.py for a ~1.3B GPT-2
# shape (24 layers, d_model 2048, 16 heads, d_ff 8192, seq 2048, vocab 50304), bf16 compute with
# fp32 parameters, one GPU, in four variants (cuDNN attention; the same under launch/gpu_env.sh's
# XLA flags; cuDNN at twice the batch with remat; XLA attention with remat), and after the first
# of them ResNet-50 at 224 px, batch 256, bf16 (IMAGE_SHAPE overrides its flags; SGD Nesterov,
# images/s and MFU; its import path needs no grain, tensorflow-datasets or llmjax.data, as
# tests/test_benchmarks.py checks), then KV-cache decoding of the same GPT in bf16 at batch 1 and
# 8 against the weight-streaming bound (generate.py --llmjax_only: no torch on the image; the
# HBM read bandwidth measured in the same run), then a Mixtral-shaped MoE step against its dense
# twin (benchmarks/train_throughput.py --model=moe; MOE_SHAPE overrides its flags), then the
# decode again with int8 kernels beside the bf16 ones (generate.py --quant=int8). Results (JSON +
# logs) go to $1 (default $OUT). Variants run
# in that order while BUDGET seconds (default 560, under the device call's 600) leave room for
# another RUN_TIMEOUT (default 130); the rest are skipped. ONLY="name ..." runs just those.
#
#   bash benchmarks/gpu_run.sh "$OUT"
#
# The GPU image has jax, flax and optax but not ml_collections: carry its wheel in .whl/
# (python3 -m pip download --no-deps -d .whl ml_collections==1.1.0, .whl/ git-ignored).
# SHAPE overrides the model flags and PYTHON the interpreter, e.g. SHAPE=--tiny
# DECODE_SHAPE=--tiny PYTHON=.venv/bin/python to try the script on a CPU (where the cuDNN runs
# fail); SHAPE also reaches the ResNet run (--tiny shrinks it too).
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
image_shape=${IMAGE_SHAPE:---model=resnet50 --image_size=224 --batch_size=256}
limit=${RUN_TIMEOUT:-130}
wanted() {  # wanted NAME: in ONLY (when given) and within the budget
  if [[ -n ${ONLY:-} && " $ONLY " != *" $1 "* ]]; then return 1; fi
  if (( SECONDS + limit > ${BUDGET:-560} )); then echo "== $1: skipped (budget)"; return 1; fi
}
run() {  # run NAME ENV_SETUP FLAGS...: ENV_SETUP is a command run in the variant's subshell first
  local name=$1 setup=$2; shift 2
  wanted "$name" || return 0
  echo "== $name: $*"
  # shellcheck disable=SC2086
  ( $setup; timeout "$limit" "$py" benchmarks/train_throughput.py $shape --dtype=bfloat16 \
      --matmul_n=8192 --steps=6 --warmup=2 "$@" --json="$out/$name.json" >"$out/$name.log" 2>&1 )
  echo "exit $?"; grep -E "tokens/s|images/s|llmjax|ceilings|compile" "$out/$name.log" | tail -4
}
gpu_env() { source launch/gpu_env.sh; echo "XLA_FLAGS=$XLA_FLAGS" >"$out/gpu_env.txt"; }
decode() {  # decode NAME [FLAGS...]: the GPT's shape in generate.py's (transformers' GPT2Config) names
  local name=$1 gpt=${DECODE_SHAPE:---n_layer=24 --n_embd=2048 --n_head=16 --vocab_size=50304 --n_positions=2048}
  shift
  wanted "$name" || return 0
  echo "== $name: $gpt $*"
  # shellcheck disable=SC2086
  timeout "$limit" "$py" benchmarks/generate.py --llmjax_only --dtype=bfloat16 $gpt \
      --batches=1,8 --prompt_len=128 --new_tokens=128 --repeats=3 "$@" --json="$out/$name.json" \
      >"$out/$name.log" 2>&1
  echo "exit $?"; tail -4 "$out/$name.log"
}
run cudnn_b8 : --attention_impl=cudnn --batch=8
# shellcheck disable=SC2086
run resnet50_b256_224px : $image_shape
decode decode_b1_b8
run cudnn_b8_gpu_env gpu_env --attention_impl=cudnn --batch=8
run cudnn_b16_dots_no_batch : --attention_impl=cudnn --batch=16 --remat=dots_no_batch
run xla_b8_dots_no_batch : --attention_impl=xla --batch=8 --remat=dots_no_batch
moe() {  # Mixtral-shaped blocks (d 4096, 32 heads / 8 kv, 8 experts of 14336, top 2), one layer so
  # three fp32-Adam states (two MoE: 1.4B parameters each) fit one GPU: MoE dropless and capacity
  # 1.25 against the dense step of equal active FLOPs
  local name=mixtral_1layer_moe_vs_dense
  # (--d_ff is the dense twin's width, top_k x the expert width of 14336)
  local moe_shape=${MOE_SHAPE:---d_model=4096 --n_layers=1 --n_heads=32 --n_kv_heads=8 --d_ff=28672 --experts=8 --top_k=2 --seq_len=2048 --batch=4 --vocab=32000}
  wanted "$name" || return 0
  echo "== $name: $moe_shape"
  # shellcheck disable=SC2086
  timeout "$limit" "$py" benchmarks/train_throughput.py --model=moe $moe_shape --dtype=bfloat16 \
      --attention_impl=cudnn --steps=6 --warmup=2 --block=2 --matmul_repeats=2 \
      --json="$out/$name.json" >"$out/$name.log" 2>&1
  echo "exit $?"; tail -4 "$out/$name.log"
}
moe
# int8 kernels (embeddings stay bf16) beside the bf16 model, in one run: ratios and both bounds
decode decode_int8_b1_b8 --quant=int8 --repeats=2
