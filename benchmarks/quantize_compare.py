"""One trained run at float32 and quantized (docs/compression.md): validation nats/byte, export
size, greedy decode tokens/s at batch 1 and 8 with the fraction of the weight-streaming bound,
and the int8 x int8 -> int32 matmul path against dequantize-on-the-fly, all in one process.

  .venv/bin/python benchmarks/quantize_compare.py --workdir=/work/runs/stdlib_gpt \
      --out=benchmarks/results/quantize_stdlib_gpt.json

Every format is evaluated on the same first --eval_batches validation batches and timed in
interleaved rounds (bench_common.time_interleaved), so the figures compare with each other;
tokens/s on a shared host are read as ratios to float32 in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import bench_common as common  # noqa: E402
import generate as decode_bench  # noqa: E402  (benchmarks/generate.py: bandwidth, bound)
import host  # noqa: E402

FORMATS = ("float32", "int8", "int4:g128", "int4:g32", "nf4:g64")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--formats", default=",".join(FORMATS))
  p.add_argument("--eval_batches", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--batches", default="1,8")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def variants(run, formats):
  """{name: (model, params)}: float32, each format, and int8 with the int32 dot."""
  from llmjax import distributed
  from llmjax.models import quant_tree
  from llmjax.hf import api
  params = distributed.to_host(run.params)
  out = {"float32": (run.model, params)}
  for name in formats:
    if name == "float32":
      continue
    qmodel, found = api.quantized_model(run.model, name)
    out[name] = (qmodel, quant_tree.quantize_tree(params, found))
  if "int8" in out:
    model = out["int8"][0]
    out["int8 (int32 dot)"] = (model.clone(cfg=_replace(model.cfg, quant_compute="int8")),
                               out["int8"][1])
  return out


def _replace(cfg, **kw):
  return dataclasses.replace(cfg, **kw)


def quality(run, workdir, models, n_batches) -> dict:
  """{name: validation nats/byte} on the same first n_batches batches."""
  import jax
  from flax import linen as nn

  from llmjax import tasks
  from llmjax.parallel import sharding
  from llmjax.train import loop, step as steplib
  task, data = tasks.setup(run.exp, workdir)
  devices = run.mesh.size
  batches = task.eval_batches(data.val, devices * math.ceil(run.exp.train.batch_size / devices),
                              n_batches)
  out = {}
  for name, (model, params) in models.items():
    fn = jax.jit(lambda state, batch, model=model: steplib.eval_step(
        state, batch, loss=steplib.bind_loss(task, model)))
    state = run.state.replace(params=params, frozen={})
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.rules_for("dp")):
      out[name] = task.report(loop.eval_sums(run.mesh, fn, state, batches))["loss"]
  return out


def sizes(workdir, step, formats) -> dict:
  """{name: bytes of the export's params/}: the float export and `llmjax quantize` of it."""
  from llmjax.cli import export
  from llmjax.weights import quantize
  tmp = tempfile.mkdtemp(prefix="quant-bench-")
  try:
    export.export(workdir, os.path.join(tmp, "float32"), step)
    out = {"float32": quantize.dir_bytes(os.path.join(tmp, "float32", "params"))}
    for name in formats:
      if name != "float32":
        quantize.quantize_export(os.path.join(tmp, "float32"), os.path.join(tmp, name), name)
        out[name] = quantize.dir_bytes(os.path.join(tmp, name, "params"))
    return out
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def decode(models, args) -> dict:
  """{batch: {name: tokens/s, decode step, fraction of the weight-streaming bound}}."""
  import jax

  from llmjax import generate
  first = next(iter(models.values()))
  bandwidth = decode_bench.memory_bandwidth(64 << 20)["bytes_per_s"]
  out = {}
  for batch in map(int, args.batches.split(",")):
    prompt = np.random.default_rng(batch).integers(
        0, first[0].cfg.vocab_size, (batch, args.prompt_len), np.int32)
    runners = {}
    for name, (model, params) in models.items():
      runners[name] = (lambda m=model, p=params, n=args.new_tokens: generate.generate(
          m, p, prompt, max_new_tokens=n).block_until_ready())
      runners[name + "/prefill"] = (lambda m=model, p=params: generate.generate(
          m, p, prompt, max_new_tokens=1).block_until_ready())
    times = common.time_interleaved(runners, args.repeats, 1)
    rows = {}
    for name, (model, params) in models.items():
      whole, prefill = times[name]["median_step_s"], times[name + "/prefill"]["median_step_s"]
      step_s = max(whole - prefill, 0.0) / max(args.new_tokens - 1, 1)
      weights = sum(x.nbytes for x in jax.tree.leaves(params))
      rows[name] = {"tokens_per_s": batch * args.new_tokens / whole, "decode_step_s": step_s,
                    "weight_bytes": weights,
                    "fraction_of_weight_streaming_bound": (weights / bandwidth / step_s
                                                           if step_s > 0 else None)}
    base = rows["float32"]["tokens_per_s"]
    for row in rows.values():
      row["vs_float32"] = row["tokens_per_s"] / base
    out[batch] = rows
  return {"bandwidth_bytes_per_s": bandwidth, "by_batch": out}


def main(argv=None) -> None:
  args = parse_args(argv)
  from llmjax.train import rundir
  formats = args.formats.split(",")
  run = rundir.restore(args.workdir, args.step)
  models = variants(run, formats)
  result = {"workdir": os.path.abspath(args.workdir), "step": run.step,
            "host": {k: v for k, v in dataclasses.asdict(host.describe()).items()
                     if k != "flags"},
            "load_average": os.getloadavg(), "eval_batches": args.eval_batches}
  # each part written as soon as it is measured: a long run on a shared host keeps what it got
  for key, measure in (("export_params_bytes", lambda: sizes(args.workdir, args.step, formats)),
                       ("nats_per_byte", lambda: quality(run, args.workdir, models,
                                                         args.eval_batches)),
                       ("decode", lambda: decode(models, args))):
    result[key] = measure()
    text = json.dumps(result, indent=2, default=str)
    print(text, flush=True)
    if args.out:
      with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
  main()
