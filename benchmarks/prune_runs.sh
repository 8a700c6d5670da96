#!/usr/bin/env bash
# The pruning rows of docs/compression.md, one run after another (each row: its train command;
# MNIST rows also `llmjax eval --split=test`). Commands and times go to runs/prune/KIND.commands.
#
#   benchmarks/prune_runs.sh mnist   # needs runs/mnist_base (experiments/vision/mnist_cnn.py)
#   benchmarks/prune_runs.sh gpt     # needs runs/gpt_base (the main job's run, or a copy of it)
#   benchmarks/prune_runs.sh gpt nm_ft oneshot_ft_0.7   # these rows only, in this order
#   then: .venv/bin/python benchmarks/prune_table.py mnist|gpt
#
# Rows: dense (1 step at lr 0: the base as it is; dense_ft: fine-tuned alike, unpruned), one-shot 50/70/90% per layer and 2:4 without
# fine-tuning (1 step at lr 0) and with it, gradual 0 -> 50/70/90% with fine-tuning. A finished
# row is skipped when run again.
#
# Environment: BASE, the run every row starts from (init_from=workdir:$BASE; default runs/gpt_base
# or runs/mnist_base; pin a step as runs/stdlib_gpt@750); OUT, where the rows go (default
# runs/prune; the table: prune_table.py KIND OUT); FT_STEPS, the fine-tuning rows' steps when
# they must be shorter than the defaults: the gradual schedule shrinks with them (pruning over
# the first three quarters, every FT_STEPS/8 (gpt) or /20 (mnist) steps, as 5 of 40 and 10 of 200);
# FT_ARGS, more overrides for every fine-tuned row (e.g. FT_ARGS=--config.optim.lr=2e-5).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
kind=${1:-}
OUT=${OUT:-runs/prune}
case "$kind" in
  mnist)
    COMMON=(--config=experiments/vision/mnist_cnn.py --config.train.init_from=workdir:${BASE:-runs/mnist_base}
            --config.train.progress=False --config.optim.warmup_steps=0
            --config.optim.schedule=constant --config.train.eval_every=1000
            --config.train.checkpoint_every=1000)
    FT=(--config.train.steps=${FT_STEPS:-200} --config.optim.lr=5e-4)
    GRADUAL=(--config.prune.end_step=$(( ${FT_STEPS:-200} * 3 / 4 ))
             --config.prune.frequency=$(( ${FT_STEPS:-200} / 20 > 1 ? ${FT_STEPS:-200} / 20 : 1 )))
    ONE_SHOT=()
    # The first conv has one input channel: no group of 4 along it.
    NM=(--config.prune.method=nm --config.prune.target=0
        "--config.prune.params=(conv1|hidden|classifier)/kernel")
    LAYER=(--config.prune.method=layer) ;;
  gpt)
    COMMON=(--config=experiments/prune/stdlib_gpt.py --config.train.init_from=workdir:${BASE:-runs/gpt_base}
            --config.train.progress=False --config.train.sample_prompts=0)
    FT=()  # the experiment's own: 40 steps of 16 sequences at lr 2e-4
    GRADUAL=()  # the experiment's own: 0 -> target over steps 0..30, every 5
    if [ -n "${FT_STEPS:-}" ]; then
      FT=(--config.train.steps=$FT_STEPS)
      GRADUAL=(--config.prune.end_step=$(( FT_STEPS * 3 / 4 ))
               --config.prune.frequency=$(( FT_STEPS / 8 > 1 ? FT_STEPS / 8 : 1 )))
    fi
    ONE_SHOT=(--config.prune.end_step=0)
    NM=(--config.prune.method=nm --config.prune.target=0 --config.prune.end_step=0)
    LAYER=() ;;
  *) echo "usage: $0 mnist|gpt" >&2; exit 2 ;;
esac
if [ -n "${FT_ARGS:-}" ]; then read -ra EXTRA <<< "$FT_ARGS"; FT+=("${EXTRA[@]}"); fi
NO_FT=(--config.train.steps=1 --config.optim.lr=0)
mkdir -p "$OUT"
row() {  # NAME ARGS...
  local name=$1 wd=$OUT/${kind}_$1; shift
  [ -e "$wd/done" ] && return
  rm -rf "$wd"
  echo "=== $name: llmjax train ${COMMON[*]} $* --workdir=$wd" >> "$OUT/$kind.commands"
  local start; start=$(date +%s)
  nice -n 10 "$BIN/llmjax" train "${COMMON[@]}" "$@" --workdir="$wd" > "$wd.log" 2>&1 \
    || { echo "FAILED $name" >> "$OUT/$kind.commands"; return; }
  if [ "$kind" = mnist ]; then
    nice -n 10 "$BIN/llmjax" eval --workdir="$wd" --split=test >> "$wd.log" 2>&1
  fi
  touch "$wd/done"
  echo "    $name took $(( $(date +%s) - start )) s" >> "$OUT/$kind.commands"
}
declare -A ROWS=([dense]="${NO_FT[*]} --config.prune.method=none" [nm_noft]="${NO_FT[*]} ${NM[*]}"
                 [nm_ft]="${FT[*]} ${NM[*]}" [dense_ft]="${FT[*]} --config.prune.method=none")
for s in 0.5 0.7 0.9; do
  ROWS[oneshot_noft_$s]="${NO_FT[*]} ${LAYER[*]} ${ONE_SHOT[*]} --config.prune.target=$s"
  ROWS[oneshot_ft_$s]="${FT[*]} ${LAYER[*]} ${ONE_SHOT[*]} --config.prune.target=$s"
  ROWS[gradual_ft_$s]="${FT[*]} ${GRADUAL[*]} ${LAYER[*]} --config.prune.target=$s"
done
ORDER=(dense dense_ft oneshot_noft_0.5 oneshot_noft_0.7 oneshot_noft_0.9 nm_noft oneshot_ft_0.5
       gradual_ft_0.5 oneshot_ft_0.7 gradual_ft_0.7 oneshot_ft_0.9 gradual_ft_0.9 nm_ft)
for name in "${@:2}"; do [ -n "${ROWS[$name]:-}" ] || { echo "unknown row $name" >&2; exit 2; }; done
[ $# -gt 1 ] && ORDER=("${@:2}")
for name in "${ORDER[@]}"; do
  # shellcheck disable=SC2086  # each row's arguments split on spaces (none holds one)
  row "$name" ${ROWS[$name]}
done
