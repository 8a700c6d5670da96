"""One mixture-of-experts layer, forward + backward, llmjax's against transformers' torch blocks
(MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock) with the same weights: tokens/s.

  python benchmarks/moe_layer.py --threads=1 --json=out.json
  python benchmarks/moe_layer.py --tiny                      # seconds (tests)

Two layer shapes, each routing --batch x --seq_len tokens of width --d_model:
- mixtral: --experts SwiGLU experts of width d_ff / top_k, --top_k per token, weights
  renormalised over the k (Mixtral's routing);
- qwen2_moe: --qwen_experts experts of width d_ff / qwen_top_k, --qwen_top_k per token, no
  renormalisation, plus a shared SwiGLU expert of --qwen_shared x the expert width behind a
  sigmoid gate (Qwen2-MoE's block).
Both route the same active expert FLOPs as a dense SwiGLU MLP of width --d_ff. Per shape, the
systems take turns (bench_common.time_interleaved): llmjax's `MoeMlp` dropless (sorted tokens,
`jax.lax.ragged_dot`), llmjax's with capacity factor --capacity (dispatch/combine einsums; drops
tokens past an expert's slots, so it computes less and its output differs), and transformers'
block with its default experts implementation (`grouped_mm` where torch has it, else eager),
from llmjax's initial weights. One step: the layer's output, the gradient of sum(output x a
fixed random cotangent) with respect to every parameter and the input. The JSON records the
largest difference between llmjax's dropless output and transformers' (float32 rounding).
Only llmjax's model code is imported (no llmjax.data).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

import bench_common as common  # noqa: E402
import torch_peers  # noqa: E402
from llmjax import config as configlib  # noqa: E402
from llmjax.models import moe  # noqa: E402

KINDS = ("mixtral", "qwen2_moe")
TINY = dict(d_model=32, d_ff=64, experts=8, top_k=2, qwen_experts=8, qwen_top_k=4, batch=2,
            seq_len=16, steps=2, warmup=1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=1408, help="the dense MLP width of equal FLOPs")
  p.add_argument("--experts", type=int, default=8, help="mixtral: experts")
  p.add_argument("--top_k", type=int, default=2, help="mixtral: experts per token")
  p.add_argument("--qwen_experts", type=int, default=16, help="qwen2_moe: experts")
  p.add_argument("--qwen_top_k", type=int, default=4, help="qwen2_moe: experts per token")
  p.add_argument("--qwen_shared", type=int, default=4,
                 help="qwen2_moe: the shared expert's width in expert widths")
  p.add_argument("--capacity", type=float, default=1.25, help="the capacity row's factor")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--kinds", default=",".join(KINDS))
  p.add_argument("--steps", type=int, default=9, help="timed steps per system (median)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--block", type=int, default=3, help="timed steps per turn")
  p.add_argument("--threads", type=int, default=0, help="pin to this many cores (0: all)")
  p.add_argument("--tiny", action="store_true", help="seconds-long shapes (tests)")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if args.tiny:
    for key, value in TINY.items():
      setattr(args, key, value)
  args.kinds = tuple(filter(None, args.kinds.split(",")))
  for kind in args.kinds:
    if kind not in KINDS:
      p.error(f"--kinds: unknown {kind!r}; allowed: {', '.join(KINDS)}")
    experts, k = shape(args, kind)[:2]
    if not 1 <= k <= experts or args.d_ff % k:
      p.error(f"{kind}: top-k {k} must be in [1, {experts}] and divide --d_ff={args.d_ff}")
  return args


def shape(args, kind: str) -> tuple[int, int, int]:
  """(experts, top-k, shared width) of a kind."""
  if kind == "mixtral":
    return args.experts, args.top_k, 0
  return args.qwen_experts, args.qwen_top_k, args.qwen_shared * args.d_ff // args.qwen_top_k


def model_config(args, kind: str, capacity: float = 0.0) -> configlib.ModelConfig:
  experts, k, shared = shape(args, kind)
  fields = configlib.model_section(
      "llama", d_model=args.d_model, d_ff=args.d_ff, n_experts=experts, experts_per_token=k,
      moe_d_ff=args.d_ff // k, shared_d_ff=shared, shared_expert_gate=bool(shared),
      norm_topk_prob=kind == "mixtral", moe_capacity_factor=capacity)
  return configlib.ModelConfig(**fields)


def jax_runner(cfg, params, x_BLD, cotangent_BLD):
  """(run one step, info): MoeMlp's output and gradients (parameters and input), jitted."""
  layer = moe.MoeMlp(cfg)

  def objective(p, x):
    return jnp.sum(layer.apply({"params": p}, x) * cotangent_BLD)

  step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
  info = {"n_params": sum(x.size for x in jax.tree.leaves(params))}

  def once():
    jax.block_until_ready(step(params, x_BLD))

  return once, info


def torch_block(kind: str, cfg, params: dict):
  """transformers' block for `kind`, its weights llmjax's (hf/moe.py's layout)."""
  import torch
  import transformers
  common_fields = dict(hidden_size=cfg.d_model, num_experts_per_tok=cfg.experts_per_token,
                       hidden_act="silu", num_hidden_layers=1, num_attention_heads=1)
  if kind == "mixtral":
    config = transformers.MixtralConfig(intermediate_size=cfg.expert_d_ff,
                                        num_local_experts=cfg.n_experts, **common_fields)
    block_class = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock
  else:
    config = transformers.Qwen2MoeConfig(
        moe_intermediate_size=cfg.expert_d_ff, num_experts=cfg.n_experts, norm_topk_prob=False,
        shared_expert_intermediate_size=cfg.shared_width, **common_fields)
    block_class = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock
  # what a model built from this config runs: transformers' default, grouped_mm where torch has it
  grouped = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
  config._experts_implementation = "grouped_mm" if grouped else "eager"
  block = block_class(config)
  e = params["experts"]
  state = {"gate.weight": params["router"]["kernel"].T,
           "experts.gate_up_proj": np.concatenate([e["wg"].transpose(0, 2, 1),
                                                   e["wi"].transpose(0, 2, 1)], axis=1),
           "experts.down_proj": e["wo"].transpose(0, 2, 1)}
  if cfg.shared_width:
    s = params["shared"]
    state.update({"shared_expert.gate_proj.weight": s["wg"]["kernel"].T,
                  "shared_expert.up_proj.weight": s["wi"]["kernel"].T,
                  "shared_expert.down_proj.weight": s["wo"]["kernel"].T,
                  "shared_expert_gate.weight": params["shared_gate"]["kernel"].T})
  block.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                         for k, v in state.items()})
  return block.train(), config._experts_implementation


def run_kind(args, kind: str) -> dict:
  """The three systems of one layer shape, taking turns; rates, and the output difference."""
  import torch
  cfg = model_config(args, kind)
  rng = np.random.default_rng(0)
  x_BLD = rng.standard_normal((args.batch, args.seq_len, args.d_model)).astype(np.float32)
  cotangent_BLD = rng.standard_normal(x_BLD.shape).astype(np.float32)
  params = jax.tree.map(np.asarray, nn.unbox(
      jax.jit(moe.MoeMlp(cfg).init)(jax.random.PRNGKey(0), x_BLD)["params"]))
  runners, infos = {}, {}
  runners["dropless"], infos["dropless"] = jax_runner(cfg, params, x_BLD, cotangent_BLD)
  capacity_cfg = model_config(args, kind, args.capacity)
  runners["capacity"], infos["capacity"] = jax_runner(capacity_cfg, params, x_BLD, cotangent_BLD)
  block, implementation = torch_block(kind, cfg, params)
  x = torch.from_numpy(x_BLD).requires_grad_()
  g = torch.from_numpy(cotangent_BLD)

  def torch_once():
    block.zero_grad(set_to_none=True)
    x.grad = None
    (block(x) * g).sum().backward()

  runners["torch"] = torch_once
  infos["torch"] = {"n_params": sum(p.numel() for p in block.parameters()),
                    "experts_implementation": implementation}
  ours = np.asarray(jax.jit(moe.MoeMlp(cfg).apply)({"params": params}, x_BLD))
  with torch.no_grad():
    theirs = block(torch.from_numpy(x_BLD)).numpy()
  timings = common.time_interleaved(runners, args.steps, args.warmup, args.block)
  tokens = args.batch * args.seq_len
  experts, k, shared = shape(args, kind)
  out = {"kind": kind, "experts": experts, "top_k": k, "expert_width": cfg.expert_d_ff,
         "shared_width": shared, "tokens_per_step": tokens,
         "dropless_max_abs_diff_vs_torch": float(np.max(np.abs(ours - theirs))),
         "torch_max_abs_output": float(np.max(np.abs(theirs)))}
  for name, timing in timings.items():
    out[name] = {**timing, **infos[name], "tokens_per_s": tokens / timing["median_step_s"],
                 "tokens_per_cpu_s": tokens / timing["median_step_cpu_s"]}
  for name in ("dropless", "capacity"):
    out[f"{name}_over_torch_tokens_per_s"] = (out[name]["tokens_per_s"] /
                                              out["torch"]["tokens_per_s"])
    out[f"{name}_over_torch_tokens_per_cpu_s"] = (out[name]["tokens_per_cpu_s"] /
                                                  out["torch"]["tokens_per_cpu_s"])
  return out


LABELS = {"dropless": "llmjax dropless", "capacity": "llmjax capacity", "torch": "transformers"}


def report(result: dict) -> str:
  env = result["environment"]
  lines = [f"moe_layer  {env['date']}  {env['backend']}, {env['cpu_count']} CPUs, load "
           f"{env['load_average_1_5_15']}, threads {result['config']['threads']}",
           common.host_line(env),
           f"d_model {result['config']['d_model']}, dense-equal width {result['config']['d_ff']}, "
           f"{result['config']['batch']} x {result['config']['seq_len']} tokens; forward + "
           "backward (parameters and input)"]
  rows = []
  for r in result["rows"]:
    for name, label in LABELS.items():
      rows.append([r["kind"], f"{r['experts']}/{r['top_k']}/{r['shared_width']}", label,
                   r[name]["tokens_per_s"], r[name]["median_step_s"],
                   r[name]["median_step_cpu_s"],
                   r.get(f"{name}_over_torch_tokens_per_s", 1.0)])
  lines.append(common.format_table(["layer", "E/k/shared", "system", "tokens/s", "median s",
                                    "CPU s", "x torch"], rows))
  lines += [f"{r['kind']}: llmjax dropless vs transformers output, max |diff| "
            f"{r['dropless_max_abs_diff_vs_torch']:.3g} (of outputs up to "
            f"{r['torch_max_abs_output']:.3g}); transformers experts: "
            f"{r['torch']['experts_implementation']}" for r in result["rows"]]
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.threads:
    common.limit_threads(args.threads)
  torch_peers.set_threads(args.threads)
  rows = [run_kind(args, kind) for kind in args.kinds]
  env = common.environment()
  config = {k: v for k, v in vars(args).items() if k != "json"}
  config["threads"] = args.threads or "default"
  result = {"benchmark": "moe_layer", "environment": env, "host_kind": env["host"]["kind"],
            "config": config, "rows": rows,
            "timing": "median of --steps per system after --warmup; systems take turns in "
                      "blocks of --block timed steps after one untimed settling step"}
  print(report(result))
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
