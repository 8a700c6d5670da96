"""DPO with the prompt shared by both completions (config.task.share_prompt) against two rows per
pair: positions and real tokens per pair over the whole training split, and the train step's
time per pair, the layouts taking turns in one process.

  python -m llmjax.data.preference_pairs --source=gettext --max_chars=120 --out=runs/share_pairs
  python benchmarks/dpo_share_prompt.py --pairs=runs/share_pairs --json=/tmp/share.json

The model and data are experiments/instruct/gettext_dpo.py's (the main job's Llama shape, the
byte chat template, seq_len 128), randomly initialised: only time is measured. The reference is
`precomputed` (its columns zeros here), so each step is the policy's forward and backward over
the rows alone, as llmjax's loop jits it (bench_common.build: AdamW, donated state); a `copy`
reference adds one forward over the same rows to either layout. Each layout's batch is its first
--batch_rows rows of the training split (real pairs, packed and padded as training sees them);
time per pair is the median step time (wall, and process CPU time, which a loaded host inflates
less) over the pairs that batch holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llmjax  # noqa: E402,F401  (first: it picks the platform before jax starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_common as common  # noqa: E402
from llmjax import config as config_lib  # noqa: E402
from llmjax.data import preference  # noqa: E402
from llmjax.tasks.dpo import DPO, REF_CHOSEN, REF_REJECTED  # noqa: E402

# name: (share_prompt, pairs_per_row, row_len, batch rows)
LAYOUTS = {"two_rows": (False, 1, 0, 32), "shared_1": (True, 1, 0, 16),
           "shared_packed": (True, 4, 0, 8), "shared_512": (True, 4, 512, 4)}


def experiment(pairs_dir: str, share: bool, per_row: int, row_len: int, rows: int):
  c = config_lib.experiment_module("instruct/gettext_dpo.py",
                                   os.path.join(os.path.dirname(__file__), "..",
                                                "experiments", "x")).get_config(None)
  c.unlock()
  c.train.init_from = ""
  c.data.files = os.path.join(pairs_dir, "train.jsonl")
  c.data.val_files = os.path.join(pairs_dir, "val.jsonl")
  c.task.update(dict(reference="precomputed", share_prompt=share, pairs_per_row=per_row,
                     row_len=row_len, completions=0))
  c.train.batch_size = rows // 2 if not share else rows  # two rows per pair without sharing
  return config_lib.resolve(c)


def counts(arrays: dict, share: bool, pairs: int) -> dict:
  """Positions, real tokens and rows per pair of one split's arrays."""
  if share:
    rows, length = arrays["tokens"].shape
    real = int((arrays["segment_ids"] > 0).sum())
  else:
    rows, length = arrays["chosen_tokens"].shape
    rows *= 2
    real = int(sum((arrays[f"{s}_segment_ids"] > 0).sum() for s in ("chosen", "rejected")))
  return {"pairs": pairs, "rows": rows, "row_len": length,
          "positions_per_pair": rows * length / pairs, "real_tokens_per_pair": real / pairs}


def batch_of(arrays: dict, exp, share: bool, rows: int) -> tuple[dict, int]:
  """The split's first rows as one step's batch (with zero reference columns); its pairs."""
  if share:
    batch = {k: v[:rows] for k, v in arrays.items()}
    pairs = sum(len(set(row[row > 0].tolist())) for row in batch["segment_ids"])
    shape = (rows, exp.task.pairs_per_row)
  else:
    batch = {k: v[:rows // 2] for k, v in arrays.items()}
    pairs, shape = rows // 2, (rows // 2,)
  batch.update({k: np.zeros(shape, np.float32) for k in (REF_CHOSEN, REF_REJECTED)})
  return batch, pairs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pairs", default="runs/share_pairs", help="preference_pairs --out directory")
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--layouts", default=",".join(LAYOUTS))
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  result, runners = {"layouts": {}}, {}
  for name in args.layouts.split(","):
    share, per_row, row_len, rows = LAYOUTS[name]
    exp = experiment(args.pairs, share, per_row, row_len, rows)
    data = preference.load(exp, None)
    dropped = data.info.get("dropped_pairs", {}).get("train", 0)
    info = counts(data.train, share, data.info["pairs"]["train"] - dropped)
    built = common.build(exp, jax.devices()[:1], task=DPO(exp, data.info))
    host, pairs = batch_of(data.train, exp, share, rows)
    batch = jax.device_put(host, built.batch_sharding)
    state = [common.init_state(built)]

    def run(built=built, batch=batch, state=state):
      with jax.set_mesh(built.mesh):
        state[0], metrics = built.train(state[0], batch)
      jax.block_until_ready(metrics)
    runners[name] = run
    result["layouts"][name] = {**info, "batch_rows": rows, "batch_pairs": pairs,
                               "cut_pairs": data.info["cut_pairs"]["train"],
                               "dropped_pairs": dropped}
    print(name, json.dumps(result["layouts"][name]), flush=True)
  times = common.time_interleaved(runners, args.steps, args.warmup)
  base = None
  for name, t in times.items():
    entry = result["layouts"][name]
    entry["median_step_s"] = t["median_step_s"]
    entry["median_step_cpu_s"] = t["median_step_cpu_s"]
    entry["step_s_per_pair"] = t["median_step_s"] / entry["batch_pairs"]
    entry["step_cpu_s_per_pair"] = t["median_step_cpu_s"] / entry["batch_pairs"]
    base = base or (entry["step_s_per_pair"], entry["step_cpu_s_per_pair"])
    entry["time_per_pair_vs_first"] = entry["step_s_per_pair"] / base[0]
    entry["cpu_per_pair_vs_first"] = entry["step_cpu_s_per_pair"] / base[1]
    print(name, json.dumps({k: entry[k] for k in (
        "median_step_s", "step_s_per_pair", "time_per_pair_vs_first", "median_step_cpu_s",
        "cpu_per_pair_vs_first")}), flush=True)
  result["environment"] = common.environment()
  if args.json:
    common.write_json(args.json, result)


if __name__ == "__main__":
  main()
