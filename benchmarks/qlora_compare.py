"""QLoRA (a quantized frozen base) vs LoRA over the float base: the LM fine-tuning comparison of
docs/finetune.md (experiments/finetune/stdlib_tests_lm.py:lora), docs/compression.md's table.

  python benchmarks/qlora_compare.py --runs=runs/qlora_lm --quants=none,int4:g64,nf4:g64 \
      --set=train.steps=30 --out=benchmarks/results/qlora_lm.json

Expects the runs `RUNS_NAME` (NAME: `none`, or the quant's kind: int4, nf4), trained with the same
`--config.finetune.base_quant` and the same --set overrides. Final metric: each run's last
validation loss; the base before fine-tuning on the same validation batches. Step time (the
median of the timed steps, the variants interleaved in rounds in this process, so they compare
with each other only) and step memory (XLA's accounting of the compiled step: arguments plus
temporaries, both also reported apart) are measured here on one fixed batch, as
finetune_compare.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as common  # noqa: E402
import finetune_compare as ftc  # noqa: E402

EXPERIMENT = "experiments/finetune/stdlib_tests_lm.py"


def _experiment(quant: str, overrides: list[str]):
  """The LoRA experiment with `quant` ("none": a float base) as config.finetune.base_quant."""
  from llmjax import config as config_lib
  module = config_lib.experiment_module(EXPERIMENT, str(ftc.ROOT / "pyproject.toml"))
  c = module.get_config("lora")
  c.unlock()
  for item in overrides:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    c[section][name] = type(c[section][name])(value)
  c.finetune.base_quant = "" if quant == "none" else quant
  return config_lib.resolve(c)


def _memory(exp) -> tuple:
  """(setup, train step, batch, state, {argument, temp, total bytes})."""
  from llmjax.parallel import sharding
  from llmjax.train import init, loop
  from llmjax.train import setup as setuplib
  s = setuplib.prepare(exp, devices=jax.devices()[:1])
  train_fn, _ = setuplib.compile_steps(s)
  batch = sharding.global_batch(next(loop._data_iterator(s, None)), s.mesh)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    m = train_fn.lower(s.abstract_state, batch).compile().memory_analysis()
  state = init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules, s.state_shardings,
                          s.trainable)  # values do not change the time (the base stays zeros)
  sizes = {"argument": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
           "total": m.argument_size_in_bytes + m.temp_size_in_bytes}
  return s, train_fn, batch, state, sizes


def _base_loss(exp) -> dict:
  """The float base before fine-tuning (LoRA's B = 0) on the runs' validation batches."""
  from llmjax.data import text
  from llmjax.train import loop
  from llmjax.train import setup as setuplib
  s = setuplib.prepare(exp, devices=jax.devices()[:1])
  state = loop.fresh_state(s)
  _, eval_fn = setuplib.compile_steps(s)
  batches = text.eval_batches(s.data.val, exp.train.batch_size, exp.train.eval_batches)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    report, _ = loop.evaluate(s, eval_fn, state, batches)
  return {"val_loss": report["loss"], "val_bits_per_byte": report.get("bits_per_byte")}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", required=True, help="workdir prefix: PREFIX_NAME per variant")
  parser.add_argument("--quants", default="none,int4:g64,nf4:g64")
  parser.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE, as the runs")
  parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default="")
  parser.add_argument("--base", type=int, default=1, help="0: skip the base's evaluation")
  args = parser.parse_args(argv)
  quants = args.quants.split(",")
  rows, runners = {}, {}
  for quant in quants:
    exp = _experiment(quant, args.set)
    s, train_fn, batch, state, memory = _memory(exp)
    holder = {"state": state}

    def run_once(train_fn=train_fn, batch=batch, holder=holder, s=s):
      with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        holder["state"], metrics = train_fn(holder["state"], batch)
      jax.block_until_ready(metrics)

    runners[quant] = run_once
    frozen = s.abstract_state.frozen
    rows[quant] = {"step_memory_bytes": memory,
                   "frozen_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen))}
  timings = common.time_interleaved(runners, args.steps, args.warmup)
  for quant in quants:  # read last: the runs may finish while this measures
    rows[quant].update(ftc._final_metric("lm", f"{args.runs}_{quant.split(':')[0]}"))
    rows[quant]["median_step_s"] = timings[quant]["median_step_s"]
    rows[quant]["step_time_vs_lora"] = (timings[quant]["median_step_s"]
                                        / timings[quants[0]]["median_step_s"])
  result = {"experiment": EXPERIMENT, "overrides": args.set, "environment": common.environment(),
            "variants": rows,
            "base": _base_loss(_experiment(quants[0], args.set)) if args.base else None}
  header = ["base", "val loss", "frozen base MB", "step memory MB (args + temp)", "step time vs lora"]
  table = [[q, rows[q]["val_loss"], rows[q]["frozen_bytes"] / 1e6,
            f"{rows[q]['step_memory_bytes']['total'] / 1e6:.1f} "
            f"({rows[q]['step_memory_bytes']['argument'] / 1e6:.1f} + "
            f"{rows[q]['step_memory_bytes']['temp'] / 1e6:.1f})",
            rows[q]["step_time_vs_lora"]] for q in quants]
  print(common.format_table(header, table))
  print(f"base before fine-tuning: {json.dumps(result['base'])}")
  common.write_json(args.out, result)


if __name__ == "__main__":
  main()
