"""Sliding-window vs full causal attention: the cost of the attention core at a length of four
windows, side by side in one process (forward + backward of one layer's core).

  python benchmarks/sliding_window.py                   # L 2048, window 512, 8 heads of 64
  python benchmarks/sliding_window.py --tiny            # seconds; checks the script only

Each implementation ("xla", "blocked") runs full causal attention and the windowed one on the
same q, k, v; the systems take turns, each timed call after the others, and the median of
--repeats is reported with the ratio windowed / full per implementation. The blocked core skips
the key blocks left of the window (models/attention.py), so its windowed call computes about
(w L - w^2 / 2) / (L^2 / 2) of the full one's scores: 7/16 at L = 4 w. XLA's core computes every
score and masks, so its ratio says what the mask alone costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.models import attention


def _core(impl: str, window: int, block: int):
  def loss(q, k, v):
    if impl == "blocked":
      out = attention.blocked_causal_attention(q, k, v, None, block, window=window)
    else:
      out = attention.fused_attention(q, k, v, None, True, "xla", False, window=window)
    return jnp.sum(out.astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--window", type=int, default=512)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--block", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  if args.tiny:
    args.window, args.heads, args.head_dim, args.block, args.repeats = 8, 2, 8, 4, 2
  length = 4 * args.window
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, length, args.heads, args.head_dim)), jnp.float32)
             for _ in range(3))
  systems = {f"{impl}/{name}": _core(impl, window, args.block)
             for impl in ("xla", "blocked") for name, window in (("full", 0),
                                                                 ("window", args.window))}
  for fn in systems.values():  # compile and warm up
    jax.block_until_ready(fn(q, k, v))
  times = {name: [] for name in systems}
  for _ in range(args.repeats):
    for name, fn in systems.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(q, k, v))
      times[name].append(time.perf_counter() - start)
  median = {name: statistics.median(t) for name, t in times.items()}
  result = {"length": length, "window": args.window, "heads": args.heads,
            "head_dim": args.head_dim, "block": args.block, "cpu": platform.processor() or
            platform.machine(), "devices": str(jax.devices()[0]), "median_s": median,
            "ratio_window_over_full": {impl: median[f"{impl}/window"] / median[f"{impl}/full"]
                                       for impl in ("xla", "blocked")},
            "blocked_tiles": {"full": attention.computed_key_blocks(length, args.block),
                              "window": attention.computed_key_blocks(length, args.block,
                                                                      args.window)}}
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
