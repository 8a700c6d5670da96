"""Compile time of the train step against depth, with and without nn.scan over the layers.

  python benchmarks/compile_time.py --layers=4,12,24,48 --json=/tmp/compile_time.json

Wall clock of `jit(train_step).lower(abstract state, abstract batch)` and of `.compile()` on a
1-device mesh; nothing is allocated. A throw-away compile of a tiny model runs first so that
one-time backend start-up is not charged to the first row. Reports the ratio
compile(deepest, scan) / compile(shallowest, scan); the issue's goal is <= 1.5 for 48 vs 4 layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import bench_common as common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_model_flags(p)
  p.add_argument("--layers", default="4,12,24,48", help="comma-separated layer counts")
  p.add_argument("--modes", default="scan,unrolled", help="scan, unrolled or both")
  p.add_argument("--no_warmup", action="store_true",
                 help="skip the throw-away compile (the first row then pays backend start-up)")
  args = p.parse_args(argv)
  common.apply_tiny(args)
  args.layers = [int(x) for x in args.layers.split(",") if x]
  args.modes = [x for x in args.modes.split(",") if x]
  if args.tiny and args.layers == [4, 12, 24, 48]:
    args.layers = [1, 2]
  if not args.layers or min(args.layers) < 1:
    p.error("--layers must be positive integers")
  if set(args.modes) - {"scan", "unrolled"} or not args.modes:
    p.error("--modes: scan, unrolled or both")
  return args


def measure(args, n_layers: int, scan: bool) -> dict:
  exp = common.experiment(args, n_layers=n_layers, scan=scan)
  b = common.build(exp, jax.devices()[:1])
  start = time.perf_counter()
  lowered = common.lower(b)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return {"n_layers": n_layers, "scan": scan, "lower_s": lowered_at - start,
          "compile_s": done - lowered_at, "total_s": done - start,
          "optimized_hlo_lines": len(compiled.as_text().splitlines())}


def ratio(rows: list[dict], scan: bool) -> dict | None:
  mine = sorted((r for r in rows if r["scan"] == scan), key=lambda r: r["n_layers"])
  if len(mine) < 2:
    return None
  lo, hi = mine[0], mine[-1]
  return {"deep_layers": hi["n_layers"], "shallow_layers": lo["n_layers"],
          "total_ratio": hi["total_s"] / lo["total_s"],
          "compile_ratio": hi["compile_s"] / lo["compile_s"]}


def run(args) -> dict:
  jax.config.update("jax_enable_compilation_cache", False)  # every row compiles from scratch
  if not args.no_warmup:
    measure(argparse.Namespace(**{**vars(args), **common.TINY}), 1, False)
  rows = [measure(args, n, mode == "scan") for mode in args.modes for n in args.layers]
  exp = common.experiment(args)
  return {"benchmark": "compile_time", "environment": common.environment(),
          "config": {"model": dataclasses.asdict(exp.model), "batch": exp.train.batch_size,
                     "seq_len": exp.data.seq_len, "tiny": args.tiny},
          "what": "wall clock of jit(train_step).lower(abstract inputs) and .compile(), "
                  "1-device mesh" + ("" if args.no_warmup else
                                     ", after a throw-away warm-up compile"),
          "rows": rows, "scan_ratio": ratio(rows, True), "unrolled_ratio": ratio(rows, False)}


def report(result: dict) -> str:
  header = ["layers", "scan", "lower s", "compile s", "total s", "HLO lines"]
  rows = [[r["n_layers"], r["scan"], r["lower_s"], r["compile_s"], r["total_s"],
           r["optimized_hlo_lines"]] for r in result["rows"]]
  env, m = result["environment"], result["config"]["model"]
  lines = [f"compile_time  {env['date']}  {env['backend']}, {env['cpu_count']} CPUs, load "
           f"{env['load_average_1_5_15']}", common.host_line(env),
           f"model: d_model {m['d_model']}, {m['n_heads']} heads, d_ff {m['d_ff']}, vocab "
           f"{m['vocab_size']}, seq {result['config']['seq_len']}, batch "
           f"{result['config']['batch']}, {m['dtype']}", "",
           common.format_table(header, rows)]
  for key, label in (("scan_ratio", "scan"), ("unrolled_ratio", "unrolled")):
    r = result[key]
    if r:
      lines.append(f"{label}: total({r['deep_layers']} layers) / total({r['shallow_layers']} "
                   f"layers) = {r['total_ratio']:.3f}  (compile only: {r['compile_ratio']:.3f})")
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  result = run(args)
  for row in result["rows"]:
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("lower_s", "compile_s")), row
  print(report(result))
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
