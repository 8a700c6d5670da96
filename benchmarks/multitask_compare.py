"""The multi-task run beside each task alone at equal total steps: docs/multitask.md's table.

  python benchmarks/multitask_compare.py --runs=runs/mt

Reads the final validation records of RUNS (the multi-task run), RUNS_lm (`:lm_only`) and
RUNS_classify (`:classify_only`) from their metrics.jsonl and prints a markdown table: LM loss
in nats/byte (the byte tokenizer) and bits/byte, classification accuracy and macro-F1, each on
the task's own validation rows (the first train.eval_batches batches of each).
"""

from __future__ import annotations

import argparse
import json
import os


def final(workdir: str) -> dict[str, dict]:
  """split -> the last evaluation's record."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  last = max(r["step"] for r in records if r["split"].startswith("val"))
  return {r["split"]: r for r in records if r["step"] == last and r["split"] != "train"}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/mt")
  runs = parser.parse_args().runs
  multi, lm, classify = final(runs), final(runs + "_lm"), final(runs + "_classify")
  rows = [("multi-task (lm + classify, half the rows each)", multi.get("val/lm"),
           multi.get("val/classify")),
          ("lm alone", lm.get("val"), None), ("classify alone", None, classify.get("val"))]
  print("| run | LM val loss (nats/byte) | LM bits/byte | classify accuracy | classify macro-F1 |")
  print("|---|---|---|---|---|")
  for name, lm_record, cls_record in rows:
    lm_cells = (f"{lm_record['loss']:.4f} | {lm_record['bits_per_byte']:.4f}" if lm_record
                else "- | -")
    cls_cells = (f"{cls_record['accuracy']:.2%} | {cls_record['f1_macro']:.4f}" if cls_record
                 else "- | -")
    print(f"| {name} | {lm_cells} | {cls_cells} |")


if __name__ == "__main__":
  main()
