#!/usr/bin/env bash
# Train every fine-tuning method for one comparison of docs/finetune.md, one run after another.
#
#   benchmarks/finetune_runs.sh lm        # needs runs/stdlib_gpt (make train)
#   benchmarks/finetune_runs.sh classify  # needs runs/stdlib_bert_mlm (experiments/text/stdlib_bert_mlm.py)
#   then: .venv/bin/python benchmarks/finetune_compare.py --task=lm --runs=runs/ft_lm
#
# Workdirs runs/ft_lm_METHOD / runs/ft_cls_METHOD; re-running resumes (finished runs only evaluate).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
case "${1:-}" in
  lm) experiment=experiments/finetune/stdlib_tests_lm.py; prefix=runs/ft_lm ;;
  classify) experiment=experiments/finetune/stdlib_classify.py; prefix=runs/ft_cls ;;
  *) echo "usage: $0 lm|classify" >&2; exit 2 ;;
esac
for method in full freeze bitfit lora adalora adapter prompt prefix; do
  echo "== $method"
  "$BIN/llmjax" train --config="$experiment:$method" --workdir="${prefix}_$method" \
      --config.train.progress=False
done
