"""An image classifier's run at float32 and quantized (docs/compression.md's MNIST CNN table):
accuracy and loss on a whole split, and the export's size, per format, in one process.

  .venv/bin/python benchmarks/quantize_image.py --workdir=runs/mnist_base \
      --formats=int8,int8:asym,int4:g0,nf4:g0 --split=test

Each format is what `llmjax quantize` writes (the same library calls): every convolution and
dense kernel stored quantized, BatchNorm and biases float; the float run and each format are
evaluated on the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--formats", default="int8,int4:g0")
  p.add_argument("--split", default="test", choices=("val", "test"))
  p.add_argument("--out", default=None, help="JSON file for the raw figures")
  return p.parse_args(argv)


def measure(workdir, step, formats, split) -> dict:
  """{format: {"accuracy", "loss", "params_bytes"}} with "float32" first."""
  from llmjax.cli import export
  from llmjax.eval import evaluate
  from llmjax.weights import quantize
  out = {}
  with tempfile.TemporaryDirectory(prefix="quantize-image-") as tmp:
    float_dir = os.path.join(tmp, "float32")
    export.export(workdir, float_dir, step)
    for name in formats:
      report = quantize.quantize_export(float_dir, os.path.join(tmp, name.replace(":", "_")),
                                        name)
      both = evaluate.quantized_reports(workdir, name, step, split)
      if not out:
        out["float32"] = {"accuracy": both["float"]["accuracy"], "loss": both["float"]["loss"],
                          "params_bytes": report["params_bytes"]["float"]}
      out[name] = {"accuracy": both[name]["accuracy"], "loss": both[name]["loss"],
                   "params_bytes": report["params_bytes"]["quantized"],
                   "largest_relative_error": max(report["relative_error"].values())}
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  results = measure(args.workdir, args.step, [f for f in args.formats.split(",") if f],
                    args.split)
  base = results["float32"]
  print(f"| format | {args.split} accuracy | {args.split} loss | export params/ | of float32 |")
  print("|---|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {100 * r['accuracy']:.2f}% | {r['loss']:.4f} | "
          f"{r['params_bytes'] / 1e6:.3f} MB | {r['params_bytes'] / base['params_bytes']:.3f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"workdir": args.workdir, "split": args.split, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
