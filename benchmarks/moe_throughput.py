"""Mixture-of-experts train step against the dense step of equal active FLOPs, side by side.

  python benchmarks/moe_throughput.py                      # a small Mixtral-like CPU shape
  python benchmarks/moe_throughput.py --tiny               # seconds (tests)
  python benchmarks/moe_throughput.py --d_model=4096 --n_layers=2 --n_heads=32 --n_kv_heads=8 \
      --d_ff=14336 --experts=8 --top_k=2 --seq_len=2048 --batch=4 --vocab=32000 --dtype=bfloat16

Three llmjax train steps (Llama blocks, SwiGLU; the loop's own jitted, donating step, LM loss
with the auxiliary losses): MoE dropless (sorted tokens, `jax.lax.ragged_dot`), MoE with
capacity factor --capacity (dispatch/combine einsums), and the dense model whose MLP width is
top_k x the expert width, so a token multiplies the same MLP weights (the router's D x E aside).
They take turns in blocks of --block timed steps (benchmarks/bench_common.time_interleaved);
the figures are medians, the ratios are what a shared host can be trusted for. The import path
needs no llmjax.data (the GPU image has no grain or tensorflow-datasets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as common  # noqa: E402
from llmjax import flops  # noqa: E402

TINY = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=0, d_ff=32, seq_len=16, batch=2,
            vocab=64, experts=4, top_k=2)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_model_flags(p, preset="llama", d_model=256, n_layers=2, n_heads=4, d_ff=352,
                         seq_len=128, batch=8, vocab=256)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--capacity", type=float, default=1.25, help="the capacity variant's factor")
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--block", type=int, default=2)
  args = p.parse_args(argv)
  if args.tiny:
    for key, value in TINY.items():
      setattr(args, key, value)
    args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
  return args


def variants(args) -> dict:
  """name -> Experiment: the expert width is --d_ff; the dense twin's MLP is top_k times it."""
  base = common.experiment(args)
  moe = dict(n_experts=args.experts, experts_per_token=args.top_k, moe_d_ff=args.d_ff)
  out = {"moe_dropless": dataclasses.replace(base, model=dataclasses.replace(base.model, **moe)),
         "moe_capacity": dataclasses.replace(base, model=dataclasses.replace(
             base.model, **moe, moe_capacity_factor=args.capacity)),
         "dense_equal_active": dataclasses.replace(base, model=dataclasses.replace(
             base.model, d_ff=args.top_k * args.d_ff))}
  return out


def runner(exp):
  b = common.build(exp, devices=common.jax.devices()[:1])
  compiled = common.lower(b).compile()
  holder = {"state": common.init_state(b)}
  batch = common.random_batch(b)
  losses = []

  def once():
    state, metrics = compiled(holder["state"], batch)
    common.jax.block_until_ready((state, metrics))
    holder["state"] = state
    losses.append(float(metrics["loss"]))
  return once, losses


def run(args) -> dict:
  exps = variants(args)
  runners, losses = {}, {}
  for name, exp in exps.items():
    runners[name], losses[name] = runner(exp)
  timing = common.time_interleaved(runners, args.steps, args.warmup, args.block)
  tokens = args.batch * args.seq_len
  out = {"environment": common.environment(), "args": vars(args), "variants": {}}
  for name, exp in exps.items():
    step_s = timing[name]["median_step_s"]
    out["variants"][name] = {
        **timing[name], "tokens_per_s": tokens / step_s,
        "train_flops_per_step": flops.train_flops_per_step(exp.model, args.batch, args.seq_len),
        "last_loss": losses[name][-1]}
  dense = out["variants"]["dense_equal_active"]["median_step_s"]
  out["step_time_ratio_vs_dense"] = {n: v["median_step_s"] / dense
                                     for n, v in out["variants"].items()}
  return out


def main(argv=None):
  args = parse_args(argv)
  out = run(args)
  print(common.host_line(out["environment"]))
  for name, v in out["variants"].items():
    print(f"{name:>20}: {v['tokens_per_s']:10.1f} tokens/s, median step {v['median_step_s']:.4f} s "
          f"({out['step_time_ratio_vs_dense'][name]:.2f}x dense), "
          f"{v['train_flops_per_step'] / 1e9:.2f} GFLOP/step")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
  main()
