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
`--compare=...,hf-torch` adds transformers' MixtralForCausalLM of the same shapes in torch,
loaded from llmjax's initial weights (llmjax.hf.save), its router loss at llmjax's weight, with
torch's AdamW set as llmjax's optimiser (benchmarks/torch_peers.py): dropless, as transformers'
Mixtral always is, with its default experts implementation. benchmarks/moe_layer.py times the
layer alone against Mixtral's and Qwen2-MoE's blocks.
"""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np

import bench_common as common
import torch_peers

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


def hf_torch_runner(exp, task, args, seed: int = 0):
  """(run one step, info): transformers' MixtralForCausalLM with llmjax's initial weights."""
  import torch
  import transformers
  from llmjax import hf
  threads = torch_peers.set_threads(args.threads, seed)
  m = exp.model
  # every MLP is sparse, so the dense width is unused: Mixtral's config reads it as the experts'
  model = task.model()
  model = model.clone(cfg=dataclasses.replace(model.cfg, d_ff=m.moe_d_ff))
  with tempfile.TemporaryDirectory() as tmp:
    hf.save(model, torch_peers.initial_params(task, seed), tmp, config_overrides=dict(
        router_aux_loss_coef=m.moe_aux_loss_weight, output_router_logits=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, attn_implementation="sdpa", dtype=torch.float32)
  model.train()
  tokens = torch.from_numpy(common.host_batch(task, exp.train.batch_size, seed)["tokens"]
                            .astype(np.int64))
  # llmjax decays matrices and experts, never norms or the embedding table (optim.NO_DECAY)
  opt, scheduler, clip = torch_peers.adamw(
      model.named_parameters(), exp.optim, exp.train.steps,
      lambda name, p: p.ndim >= 2 and "embed_tokens" not in name)
  info = {"losses": [], "threads": threads, "peer": f"transformers {type(model).__name__}",
          "experts_implementation": model.config._experts_implementation,
          "n_params": sum(p.numel() for p in model.parameters())}
  loss_fn = lambda: model(input_ids=tokens, labels=tokens).loss  # noqa: E731
  return torch_peers.train_step(loss_fn, opt, scheduler, clip, info), info


def _compare_error(args) -> str:
  if set(args.compare) - {"bf16", "hf-torch"} - set(COMPARE):
    return "--model=moe compares with dense, moe-capacity, bf16 and hf-torch only"
  return ""


def family(text: common.Family) -> common.Family:
  """The text family with the MoE experiment; transformers' Mixtral as the torch peer."""
  return dataclasses.replace(
      text, tiny=TINY, experiment=experiment, describe=describe, torch_runner=hf_torch_runner,
      compare_error=_compare_error, plain_jax_runner=None)
