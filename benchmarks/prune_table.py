"""docs/compression.md's pruning table from benchmarks/prune_runs.sh's workdirs (runs/prune/).

  .venv/bin/python benchmarks/prune_table.py mnist|gpt [OUT]   # OUT: prune_runs.sh's, runs/prune

gpt: validation nats/byte of each row's final evaluation; mnist: test accuracy (llmjax eval
--split=test). Sparsity: zeros over every pruned kernel, as the run reports it.
"""

import glob
import json
import os
import sys

ROWS = [("dense", "none", "no"), ("dense_ft", "none", "yes"), ("oneshot_noft_0.5", "one-shot 50%", "no"),
        ("oneshot_noft_0.7", "one-shot 70%", "no"), ("oneshot_noft_0.9", "one-shot 90%", "no"),
        ("nm_noft", "one-shot 2:4", "no"), ("oneshot_ft_0.5", "one-shot 50%", "yes"),
        ("gradual_ft_0.5", "gradual 0 -> 50%", "yes"), ("oneshot_ft_0.7", "one-shot 70%", "yes"),
        ("gradual_ft_0.7", "gradual 0 -> 70%", "yes"), ("oneshot_ft_0.9", "one-shot 90%", "yes"),
        ("gradual_ft_0.9", "gradual 0 -> 90%", "yes"), ("nm_ft", "one-shot 2:4", "yes")]


def result(kind: str, name: str, out: str = "runs/prune"):
  """(sparsity, metric) of one row, or None when it has not finished."""
  wd = f"{out}/{kind}_{name}"
  if not os.path.exists(f"{wd}/done"):
    return None
  with open(f"{wd}/metrics.jsonl") as f:
    val = [r for r in map(json.loads, f) if r["split"] == "val"][-1]
  if kind == "mnist":
    with open(glob.glob(f"{wd}/eval/*_test.json")[0]) as f:
      test = json.load(f)
    return test.get("sparsity", 0.0), f"{100 * test['accuracy']:.2f}%"
  return val.get("sparsity", 0.0), f"{val['loss']:.4f}"


def main(kind: str, out: str = "runs/prune") -> None:
  metric = "test accuracy" if kind == "mnist" else "val nats/byte"
  print(f"| pruning | fine-tuned | sparsity | {metric} |\n|---|---|---|---|")
  for name, what, tuned in ROWS:
    found = result(kind, name, out)
    if found is not None:
      print(f"| {what} | {tuned} | {found[0]:.3f} | {found[1]} |")


if __name__ == "__main__":
  main(*sys.argv[1:3])
