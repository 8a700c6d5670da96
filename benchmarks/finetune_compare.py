"""Every fine-tuning method side by side: final metric, parameters, optimizer state, step time
and step memory (docs/finetune.md).

  python benchmarks/finetune_compare.py --task=lm --runs=runs/ft_lm --out=benchmarks/results/finetune_lm.json
  python benchmarks/finetune_compare.py --task=classify --runs=runs/ft_cls --out=...

Expects the runs `RUNS_METHOD` of benchmarks/finetune_runs.sh. Their final metric comes from
the runs' own records (lm: the last validation loss; classify: the test split, evaluated here
as `llmjax eval --split=test` does). Step time and memory are measured here, on one fixed batch
per task, every method's compiled step in one process, interleaved in rounds so load drift hits
all alike (median of the timed steps); memory is the compiled step's arguments plus temporaries
(XLA's own accounting; on CPU nothing else is comparable). Unlike the other benchmarks this one
reads real data, so it runs where the runs ran, not on the GPU box.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as common  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = {"lm": "experiments/finetune/stdlib_tests_lm.py",
               "classify": "experiments/finetune/stdlib_classify.py"}


def _experiment(task: str, method: str):
  from llmjax import config as config_lib
  module = config_lib.experiment_module(EXPERIMENTS[task], str(ROOT / "pyproject.toml"))
  return module, config_lib.resolve(module.get_config(method))


def _compiled(exp):
  """(setup, jitted train step, fixed batch, state, step memory in bytes)."""
  from llmjax.parallel import sharding
  from llmjax.train import init, loop
  from llmjax.train import setup as setuplib
  s = setuplib.prepare(exp, devices=jax.devices()[:1])
  train_fn, _ = setuplib.compile_steps(s)
  batch = sharding.global_batch(next(loop._data_iterator(s, None)), s.mesh)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    memory = train_fn.lower(s.abstract_state, batch).compile().memory_analysis()
  state = init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules, s.state_shardings,
                          s.trainable)  # values do not change the time: no need for the base
  return s, train_fn, batch, state, memory.argument_size_in_bytes + memory.temp_size_in_bytes


def _final_metric(task: str, workdir: str) -> dict:
  if task == "classify":
    from llmjax.eval.evaluate import evaluate_run
    report = evaluate_run(workdir, split="test")
    return {"test_accuracy": report["accuracy"], "test_f1_macro": report["f1_macro"]}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  val = [r for r in records if r["split"] == "val"][-1]
  return {"val_loss": val["loss"], "val_bits_per_byte": val.get("bits_per_byte")}


def _base_loss(task: str, method: str) -> dict | None:
  """The base before any fine-tuning, on the same validation batches (lm only)."""
  if task != "lm":
    return None
  from llmjax.data import text
  from llmjax.train import loop
  from llmjax.train import setup as setuplib
  _, exp = _experiment(task, method)
  s = setuplib.prepare(exp, devices=jax.devices()[:1])
  state = loop.fresh_state(s)
  _, eval_fn = setuplib.compile_steps(s)
  batches = text.eval_batches(s.data.val, exp.train.batch_size, exp.train.eval_batches)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    report, _ = loop.evaluate(s, eval_fn, state, batches)
  return {"val_loss": report["loss"], "val_bits_per_byte": report.get("bits_per_byte")}


def config_lib_methods(module) -> tuple[str, ...]:
  from llmjax import config as config_lib
  return config_lib.experiment_module("methods.py", module.__file__).METHODS


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", choices=sorted(EXPERIMENTS), required=True)
  parser.add_argument("--runs", required=True, help="workdir prefix: PREFIX_METHOD per method")
  parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  from llmjax.finetune import params_report
  module, _ = _experiment(args.task, "full")
  methods = config_lib_methods(module)
  rows, runners = {}, {}
  for method in methods:
    _, exp = _experiment(args.task, method)
    s, train_fn, batch, state, memory = _compiled(exp)
    holder = {"state": state}

    def run_once(train_fn=train_fn, batch=batch, holder=holder, s=s):
      with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        holder["state"], metrics = train_fn(holder["state"], batch)
      jax.block_until_ready(metrics)

    runners[method] = run_once
    report = params_report(exp, s.abstract_state, None)
    rows[method] = {"trainable": report["trainable"], "total": report["total"],
                    "optimizer_state_bytes": report["optimizer_state_bytes"],
                    "step_memory_bytes": memory,
                    **_final_metric(args.task, f"{args.runs}_{method}")}
  timings = common.time_interleaved(runners, args.steps, args.warmup)
  for method in methods:
    rows[method]["median_step_s"] = timings[method]["median_step_s"]
  result = {"task": args.task, "environment": common.environment(), "methods": rows,
            "base": _base_loss(args.task, "full")}
  metric_keys = [k for k in rows[methods[0]] if k.startswith(("val_", "test_"))]
  header = ["method", *metric_keys, "trainable", "% of total", "optimizer state MB",
            "step s", "step memory MB"]
  table = [[m, *[rows[m][k] for k in metric_keys], rows[m]["trainable"],
            100 * rows[m]["trainable"] / rows[m]["total"], rows[m]["optimizer_state_bytes"] / 1e6,
            rows[m]["median_step_s"], rows[m]["step_memory_bytes"] / 1e6] for m in methods]
  print(common.format_table(header, table))
  if result["base"]:
    print(f"base before fine-tuning: {result['base']}")
  common.write_json(args.out, result)


if __name__ == "__main__":
  main()
