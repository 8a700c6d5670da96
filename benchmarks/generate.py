"""Greedy decoding tokens/s: llmjax (KV cache, one compiled loop) vs transformers' torch generate.

  python benchmarks/generate.py --json=/tmp/generate.json   # GPT-2 shape, 6 x 384, batch 1 and 8
  python benchmarks/generate.py --tiny                      # seconds; checks the script only
  python benchmarks/generate.py --quant=int8,int4           # also int8 and int4 kernels
  python benchmarks/generate.py --llmjax_only --dtype=bfloat16 --n_layer=24 --n_embd=2048 \
      --n_head=16 --vocab_size=50304 --n_positions=2048      # a ~1.3B GPT on a GPU, no torch

Against the hardware: batch-B decoding reads every weight once per step (and the KV cache), so
a decode step cannot take less than weight bytes / memory bandwidth (the weight-streaming
bound). The script measures the bandwidth in the same run (the best of a jitted sum and a
jitted matrix-vector product over a buffer much larger than the caches), times llmjax's decode
step apart from its prefill (a call with --new_tokens against one with a single new token:
the difference over new_tokens - 1 steps), and reports the fraction of the bound reached,
bound seconds / measured seconds per step.

--quant=int8,int4 (config.model.quant specs) also decodes with the dense kernels quantized from
the same weights (llmjax.models.quant_tree; embeddings, norms and biases stay float), in the same
rounds: each format's bound counts its own weight bytes, and its tokens/s and decode step are
also given as ratios to the float model's.

Both run the same random GPT-2 (built with transformers, saved as safetensors, loaded into
llmjax), fp32, on the same CPU in the same process, from the same prompt, for the same number of
new tokens (no EOS), and must produce identical tokens. Time is the wall time of one whole
`generate` call (prompt prefill + decode); the median of --repeats after one warm-up (which
compiles JAX). The systems take turns in blocks of --block timed calls, each block after one
untimed settling call (as in train_throughput.py), so that load from other processes hits both
alike without charging either for the switch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import bench_common as common  # noqa: E402
from llmjax.errors import ConfigError  # noqa: E402
from llmjax.models import quant  # noqa: E402

REFERENCE = dict(n_layer=6, n_embd=384, n_head=6, vocab_size=50257, n_positions=1024)
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--block", type=int, default=3,
                 help="timed calls of one system before switching to the other, after one "
                      "untimed settling call (1: strict alternation, no settling)")
  p.add_argument("--threads", type=int, default=0,
                 help="pin the process to this many cores, torch threads to match (0: all cores, "
                      "each library's default threads); applied before JAX starts")
  p.add_argument("--llmjax_only", action="store_true",
                 help="time llmjax alone on a random init of the same config (no torch needed: "
                      "the GPU image has none); torch columns are then empty")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="llmjax's parameter and compute dtype (bfloat16 with --llmjax_only only)")
  for name, value in REFERENCE.items():  # transformers' GPT2Config names
    p.add_argument(f"--{name}", type=int, default=value)
  p.add_argument("--quant", default="",
                 help="also decode with the kernels quantized as each of these config.model.quant "
                      "specs, comma-separated (e.g. int8,int4 or int4:g32)")
  p.add_argument("--tiny", action="store_true", help="tiny model and budget (tests)")
  p.add_argument("--json", default="", help="write the results here as JSON")
  args = p.parse_args(argv)
  args.batches = [int(b) for b in args.batches.split(",") if b]
  args.shape = {name: getattr(args, name) for name in REFERENCE}
  args.quant = [q for q in args.quant.split(",") if q]
  for spec in args.quant:
    try:
      quant.parse(spec, "--quant")
    except ConfigError as e:
      p.error(str(e))
  if args.tiny:
    args.prompt_len, args.new_tokens, args.repeats, args.block = 4, 8, 1, 1
    args.shape = dict(TINY)
  if args.dtype != "float32" and not args.llmjax_only:
    p.error("--dtype=bfloat16 needs --llmjax_only (the torch side runs float32)")
  if (not args.batches or min(args.batches) < 1 or args.new_tokens < 1 or args.repeats < 1
      or args.block < 1):
    p.error("--batches, --new_tokens, --repeats and --block must be positive")
  return args


def memory_bandwidth(n_bytes: int, repeats: int = 5) -> dict:
  """Read bandwidth (bytes/s) of this device: the best single shot of a jitted sum and of a
  jitted matrix-vector product (decoding's own access pattern) over an n_bytes float32 buffer."""
  import jax
  import jax.numpy as jnp
  columns = 1024
  matrix = jnp.ones((max(n_bytes // (4 * columns), 1), columns), jnp.float32)
  vector = jnp.ones((columns,), jnp.float32)
  sum_all, matvec = jax.jit(jnp.sum), jax.jit(lambda m, v: m @ v)
  shots = {"sum": lambda: sum_all(matrix).block_until_ready(),
           "matvec": lambda: matvec(matrix, vector).block_until_ready()}
  best = {name: matrix.nbytes / min(common.time_steps(shot, repeats, 1)["step_times_s"])
          for name, shot in shots.items()}
  return {"bytes_per_s": max(best.values()), "by_kernel": best, "buffer_bytes": matrix.nbytes}


def weight_bytes(params) -> int:
  import jax
  return sum(x.nbytes for x in jax.tree.leaves(params))


def cache_bytes(cfg, batch: int, length: int) -> int:
  """The KV cache's size at `length` positions: keys and values of every layer."""
  kv_heads = cfg.n_kv_heads or cfg.n_heads
  itemsize = np.dtype(cfg.dtype).itemsize
  return 2 * cfg.n_layers * batch * length * kv_heads * (cfg.d_model // cfg.n_heads) * itemsize


def measure(model, params, torch_model, batch: int, args, weights: int, bandwidth: float,
            quantized: dict | None = None) -> dict:
  """One batch size: llmjax's whole call and its prefill, and torch's generate unless
  torch_model is None, taking turns; `weights` bytes read at `bandwidth` bytes/s bound a step.
  `quantized` ({spec: (model, params)}) join the same rounds; their rows go under "quantized"."""
  from llmjax import generate
  vocab = model.cfg.vocab_size
  prompt = np.random.default_rng(batch).integers(0, vocab, (batch, args.prompt_len), np.int32)
  systems = {"llmjax": (model, params), **{f"llmjax {spec}": pair
                                           for spec, pair in (quantized or {}).items()}}
  results, runners = {}, {}

  def llmjax_runner(name, key, new_tokens):
    def run_once():
      out = generate.generate(*systems[name], prompt, max_new_tokens=new_tokens)
      results[key] = np.asarray(out.block_until_ready())
    return run_once

  def run_torch():
    import torch
    with torch.inference_mode():
      ids = torch.from_numpy(prompt).long()
      out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=0)
    results["torch"] = out[:, args.prompt_len:].numpy()

  for name in systems:  # the prompt's prefill and one new token: the non-decode part
    runners[name] = llmjax_runner(name, name, args.new_tokens)
    runners[name + "_prefill"] = llmjax_runner(name, name + "_prefill", 1)
  if torch_model is not None:
    runners["torch"] = run_torch
  times = common.time_interleaved(runners, args.repeats, 1, block=args.block)
  with_torch = torch_model is not None
  row = {"batch": batch, **_decode_figures(times, "llmjax", batch, args, weights, bandwidth)}
  torch_s = times["torch"]["median_step_s"] if with_torch else None
  row.update({"torch_tokens_per_s": batch * args.new_tokens / torch_s if with_torch else None,
              "ratio": torch_s / times["llmjax"]["median_step_s"] if with_torch else None,
              "llmjax_first_call_s": times["llmjax"]["first_call_s"],
              "same_tokens": (bool(np.array_equal(results["llmjax"], results["torch"]))
                              if with_torch else None),
              "cache_bytes_at_end": cache_bytes(model.cfg, batch,
                                                args.prompt_len + args.new_tokens),
              "times": times})
  if quantized:
    row["quantized"] = {}
    for spec, (_, qparams) in quantized.items():
      q = _decode_figures(times, f"llmjax {spec}", batch, args, weight_bytes(qparams), bandwidth)
      q["tokens_per_s_vs_float"] = q["llmjax_tokens_per_s"] / row["llmjax_tokens_per_s"]
      q["decode_step_speedup_vs_float"] = (row["llmjax_decode_step_s"] / q["llmjax_decode_step_s"]
                                           if q["llmjax_decode_step_s"] > 0 else None)
      q["same_tokens_as_float"] = bool(np.array_equal(results[f"llmjax {spec}"],
                                                      results["llmjax"]))
      row["quantized"][spec] = q
  return row


def _decode_figures(times: dict, name: str, batch: int, args, weights: int,
                    bandwidth: float) -> dict:
  """Tokens/s of runner `name`, its decode step (its call minus its prefill call's) and the
  fraction of the weight-streaming bound of `weights` bytes at `bandwidth` bytes/s."""
  whole_s, prefill_s = times[name]["median_step_s"], times[name + "_prefill"]["median_step_s"]
  # Each decode step after the first new token; floored at 0 only so noise cannot go negative.
  step_s = max(whole_s - prefill_s, 0.0) / max(args.new_tokens - 1, 1)
  bound_s = weights / bandwidth
  return {"llmjax_tokens_per_s": batch * args.new_tokens / whole_s,
          "llmjax_prefill_s": prefill_s, "llmjax_decode_step_s": step_s,
          "weight_bytes": weights, "weight_streaming_bound_s": bound_s,
          "fraction_of_weight_streaming_bound": bound_s / step_s if step_s > 0 else None}


def quantized_models(model, params, specs) -> dict:
  """{spec: (the model storing its dense kernels as `spec` says, `params` quantized so)}."""
  import jax

  from llmjax.hf import api
  from llmjax.models import quant_tree
  out = {}
  for spec in specs:
    qmodel, found = api.quantized_model(model, spec)
    out[spec] = (qmodel, jax.block_until_ready(quant_tree.quantize_tree(params, found)))
  return out


def models(args):
  """(llmjax model, its params, transformers' torch model or None) for the flags' GPT-2 shape.
  With torch: transformers' random GPT-2, saved and loaded into llmjax (the same weights). With
  --llmjax_only: the same config read by llmjax (`hf.build`), randomly initialised."""
  import transformers  # configs need no torch

  from llmjax import hf
  config = transformers.GPT2Config(**args.shape, bos_token_id=None, eos_token_id=None)
  with tempfile.TemporaryDirectory() as directory:
    if args.llmjax_only:
      config.save_pretrained(directory)
      model = hf.build(directory, dtype=args.dtype)
      import jax
      from flax import linen as nn
      tokens = np.zeros((1, min(8, args.shape["n_positions"])), np.int32)
      params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
      return model, params, None
    import torch
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel(config).eval()
    torch_model.save_pretrained(directory)
    model, params = hf.load(directory)
    return model, params, torch_model


def run(args) -> dict:
  if args.threads and not args.llmjax_only:
    import torch
    torch.set_num_threads(args.threads)
  model, params, torch_model = models(args)
  # A buffer 4x the weights (at least 256 MiB, at most 4 GiB) so that no cache holds it.
  floor, weights = (64 if args.tiny else 256) << 20, weight_bytes(params)
  bandwidth = memory_bandwidth(min(max(4 * weights, floor), 4 << 30))
  try:
    quantized = quantized_models(model, params, args.quant)
  except ConfigError as e:  # e.g. a group that does not divide this model's widths
    print(f"--quant: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  rows = [measure(model, params, torch_model, batch, args, weights, bandwidth["bytes_per_s"],
                  quantized) for batch in args.batches]
  torch_threads = None
  if torch_model is not None:
    import torch
    torch_threads = torch.get_num_threads()
  return {"benchmark": "generate", "environment": common.environment(),
          "memory_bandwidth": bandwidth,
          "config": {"model": {"hf_class": "GPT2LMHeadModel", "dtype": args.dtype, **args.shape},
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "block": args.block, "tiny": args.tiny,
                     "llmjax_only": args.llmjax_only, "threads": args.threads or "default",
                     "quant": args.quant,
                     "torch_threads": torch_threads},
          "what": "wall time of one greedy generate call (prefill + decode), median; "
                  "tokens/s = batch x new_tokens / time; ratio = torch time / llmjax time; "
                  "decode step = (time - time with one new token) / (new_tokens - 1); "
                  "weight-streaming bound = weight bytes / measured read bandwidth; fraction = "
                  "bound / decode step; quantized rows: the same with their own weight bytes",
          "rows": rows}


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.threads:
    common.limit_threads(args.threads)
  result = run(args)
  table = [[r["batch"], r["llmjax_tokens_per_s"], r["torch_tokens_per_s"], r["ratio"],
            r["same_tokens"], 1e3 * r["llmjax_decode_step_s"], 1e3 * r["weight_streaming_bound_s"],
            r["fraction_of_weight_streaming_bound"]] for r in result["rows"]]
  bandwidth = result["memory_bandwidth"]
  print(common.host_line(result["environment"]))
  print(f"read bandwidth {bandwidth['bytes_per_s'] / 1e9:.4g} GB/s (best of "
        + ", ".join(f"{k} {v / 1e9:.4g}" for k, v in bandwidth["by_kernel"].items())
        + f"); weights {result['rows'][0]['weight_bytes'] / 1e6:.4g} MB")
  print(common.format_table(["batch", "llmjax tok/s", "torch tok/s", "ratio", "same tokens",
                             "decode ms/step", "bound ms/step", "fraction of bound"], table))
  if args.quant:
    print(common.format_table(
        ["batch", "weights", "MB", "tok/s", "vs float", "decode ms/step", "step speedup",
         "bound ms/step", "fraction of bound", "same tokens as float"],
        [row for r in result["rows"] for row in _quant_table(r, args.dtype)]))
  common.write_json(args.json, result)
  return result


def _quant_table(row: dict, dtype: str) -> list[list]:
  """One batch's lines of the quantized table: the float model's, then each spec's."""
  lines = [[row["batch"], dtype, row["weight_bytes"] / 1e6, row["llmjax_tokens_per_s"], 1.0,
            1e3 * row["llmjax_decode_step_s"], 1.0, 1e3 * row["weight_streaming_bound_s"],
            row["fraction_of_weight_streaming_bound"], True]]
  for spec, q in row.get("quantized", {}).items():
    lines.append([row["batch"], spec, q["weight_bytes"] / 1e6, q["llmjax_tokens_per_s"],
                  q["tokens_per_s_vs_float"], 1e3 * q["llmjax_decode_step_s"],
                  q["decode_step_speedup_vs_float"], 1e3 * q["weight_streaming_bound_s"],
                  q["fraction_of_weight_streaming_bound"], q["same_tokens_as_float"]])
  return lines


if __name__ == "__main__":
  main()
