"""The mixture-of-experts family of train_throughput.py (--model=moe): a Mixtral-shaped step beside
the dense step of equal active FLOPs.

  python benchmarks/train_throughput.py --model=moe --d_model=256 --n_layers=2 --n_heads=4 \
      --d_ff=704 --seq_len=128 --batch=8 --vocab=256    # a small CPU shape
  python benchmarks/train_throughput.py --model=moe --tiny            # seconds (tests)

Llama blocks (RoPE, RMSNorm, SwiGLU: Mixtral's shape) whose MLP is --experts SwiGLU experts of
width d_ff / top_k, top_k per token, dropless (sorted tokens, `jax.lax.ragged_dot`): a token
multiplies the same MLP weights as the dense Llama with MLP width --d_ff (the router's D x E
aside), so the `dense` row is the dense step of equal active FLOPs. Beside it (--compare, default
`dense,moe-capacity`): `moe-capacity`, the same MoE with capacity factor --capacity (dispatch and
combine einsums). The step is llmjax's own with the LM loss and its auxiliary losses; FLOPs count
active parameters (llmjax.flops). This folds in what benchmarks/moe_throughput.py measured.
"""

from __future__ import annotations

import dataclasses

import bench_common as common

MODELS = ("moe",)
# Mixtral's proportions at a seconds-long size: 8 experts, 2 per token.
TINY = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=0, d_ff=64, seq_len=16, batch=2,
            vocab=64, experts=8, top_k=2)
# --compare systems of this family: flag value -> (JSON key, short name, report label).
COMPARE = {"dense": ("jax_dense", "dense", "llmjax dense, equal active FLOPs"),
           "moe-capacity": ("jax_capacity", "capacity", "llmjax MoE, capacity dispatch")}


def add_flags(parser) -> None:
  parser.add_argument("--experts", type=int, default=8, help="--model=moe: experts per layer")
  parser.add_argument("--top_k", type=int, default=2,
                      help="--model=moe: experts per token; an expert's width is d_ff / top_k")
  parser.add_argument("--capacity", type=float, default=1.25,
                      help="--model=moe: the capacity factor of the moe-capacity row")


def check(args) -> str:
  """Why these flags cannot run the MoE family ("" when they can)."""
  if args.top_k < 1 or args.top_k > args.experts:
    return f"--top_k={args.top_k} must be in [1, --experts={args.experts}]"
  if args.d_ff % args.top_k:
    return f"--d_ff={args.d_ff} must be a multiple of --top_k={args.top_k} (expert width)"
  if args.capacity <= 0:
    return f"--capacity={args.capacity} must be > 0"
  return ""


def dense_experiment(args):
  """The dense Llama twin: MLP width --d_ff."""
  return common.experiment(args, mesh=args.mesh, rules=args.rules)


def experiment(args, capacity: float = 0.0):
  """The MoE: each MLP --experts experts of width d_ff / top_k (capacity 0: dropless)."""
  base = dense_experiment(args)
  moe = dict(n_experts=args.experts, experts_per_token=args.top_k,
             moe_d_ff=args.d_ff // args.top_k, moe_capacity_factor=capacity)
  return dataclasses.replace(base, model=dataclasses.replace(base.model, **moe))


def variants(args) -> dict:
  """JSON key -> Experiment of each --compare system of this family that was asked for."""
  make = {"dense": lambda: dense_experiment(args),
          "moe-capacity": lambda: experiment(args, args.capacity)}
  return {COMPARE[name][0]: make[name]() for name in args.compare if name in COMPARE}


def describe(exp, args) -> str:
  m = exp.model
  return (f"model: MoE, {m.n_layers} Llama blocks, d_model {m.d_model}, {m.n_heads} heads, "
          f"{m.n_experts} experts of width {m.moe_d_ff}, top {m.experts_per_token} (dense twin: "
          f"d_ff {args.d_ff}), vocab {m.vocab_size}, seq {exp.data.seq_len}, batch "
          f"{exp.train.batch_size}, {m.dtype}, remat {m.remat}, scan {m.scan_layers}")


def family(text: common.Family) -> common.Family:
  """The text family with the MoE experiment; no torch or plain-jax counterpart."""
  return dataclasses.replace(
      text, tiny=TINY, experiment=experiment, describe=describe, torch_runner=None,
      compare_error=lambda args: "--model=moe compares with dense and moe-capacity only",
      plain_jax_runner=None)
