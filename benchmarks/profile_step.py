"""Where a train step's time goes: a jax.profiler trace joined to the compiled HLO, by model part.

  python benchmarks/profile_step.py                      # the reference config (GPT-2, 6 x 512)
  python benchmarks/profile_step.py --preset=llama --d_model=256 --n_layers=4 --n_heads=4 \\
      --d_ff=704 --seq_len=128 --batch=32 --vocab=256    # the main job's shapes
  python benchmarks/profile_step.py --tiny               # seconds; checks the script only

The step is llmjax's own, jitted as the loop jits it (bench_common.build). After compilation and
--warmup steps, --steps steps run under `jax.profiler.trace`. XLA:CPU and XLA:GPU name each trace
event after the HLO instruction (thunk or kernel) it ran, so every event is joined by name to the
optimized HLO of the same compiled step, whose `op_name` metadata says which jax operation and
flax module the instruction came from. Event time is summed per instruction and grouped into
parts (PARTS: the first pattern that matches the op_name wins).

On CPU the default is one pinned core (--threads=1): with several threads XLA:CPU's Eigen dots
finish asynchronously on its pool after their thunk's trace event has ended, so their time
escapes the trace (on the reference config two threads' events covered ~1.3 s of a 2.4 s step,
with the logits matmul traced at 16 ms for ~100 ms of work); on one core the events cover ~90%
of the wall time. `coverage` in the output is that fraction: below ~0.8 the parts are not a
picture of the step.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import bench_common as common  # noqa: E402

# (part, regular expression searched in "opcode op_name"): the first match names the part. Model
# work sits under jvp(<Module>) (forward) and transpose(jvp(<Module>)) (backward) with llmjax's
# module names (attn with q/k/v/o, mlp, norm1/norm2/final_norm, embed, lm_head, mask); the
# objective outside the model under a bare jvp(); the rest (no jvp) is the optimizer update,
# inside apply_if_finite's cond, the gradient norms and the metrics.
PARTS = (
    ("loss (cross-entropy over the vocabulary)", r"jvp\(\)"),
    ("attention projections (q, k, v, o)", r"/attn/(q|k|v|o|query|key|value|out)/"),
    ("attention core (scores, mask, softmax, probs x V)", r"/attn/"),
    ("MLP matmuls", r"^(dot|convolution) .*/mlp/|/mlp/\w+/dot_general"),
    ("MLP elementwise (activation)", r"/mlp/"),
    ("norms", r"norm"),
    ("logits and embeddings", r"attend|lm_head|embed"),
    ("masks and positions", r"/mask/"),
    ("other model work (residuals)", r"jvp\("),
    ("optimizer update, gradient norms, metrics", r"^\S+ \S"),
)
OTHER = "other"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_model_flags(p)
  p.add_argument("--steps", type=int, default=2, help="profiled steps")
  p.add_argument("--warmup", type=int, default=2, help="unprofiled steps after compilation")
  p.add_argument("--top", type=int, default=15, help="slowest instructions listed")
  p.add_argument("--trace_dir", default="", help="keep the trace here (default: a temp dir)")
  p.add_argument("--threads", type=int, default=1,
                 help="pin the process to this many cores before JAX starts (0: all cores; "
                      "see above why 1 is the default)")
  args = p.parse_args(argv)
  common.apply_tiny(args)
  if args.tiny:
    args.steps, args.warmup = 1, 1
  if args.steps < 1 or args.warmup < 0:
    p.error("--steps must be >= 1 and --warmup >= 0")
  return args


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\s([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (opcode, op_name) for every instruction of the optimized HLO text. A
  fusion without op_name of its own takes the first op_name found inside its fused computation."""
  found, computation_op_name = {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and "=" not in line.split("{")[0]:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode = match.groups()
    op_name = _OP_NAME.search(line)
    op_name = op_name.group(1) if op_name else ""
    if op_name and computation and computation not in computation_op_name:
      computation_op_name[computation] = op_name
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    found[name] = (opcode, op_name, calls.group(1) if calls else "")
  return {name: (opcode, op_name or computation_op_name.get(called, ""))
          for name, (opcode, op_name, called) in found.items()}


def part_of(opcode: str, op_name: str) -> str:
  text = f"{opcode} {op_name}"
  for part, pattern in PARTS:
    if re.search(pattern, text):
      return part
  return OTHER


def trace_events(trace_dir: pathlib.Path) -> list[dict]:
  """Complete ('X') events of the perfetto trace jax.profiler wrote under trace_dir."""
  paths = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
  if not paths:
    raise SystemExit(f"profile_step: no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def attribute(events: list[dict], instructions: dict, steps: int) -> dict:
  """Per-step microseconds by part and by instruction, for the events named after instructions."""
  by_part, by_instruction = collections.Counter(), collections.Counter()
  for event in events:
    name = event["name"]
    if name in instructions:
      by_instruction[name] += event["dur"] / steps
  for name, us in by_instruction.items():
    by_part[part_of(*instructions[name])] += us
  return {"by_part": dict(by_part), "by_instruction": dict(by_instruction)}


def profile(args) -> dict:
  exp = common.experiment(args)
  b = common.build(exp, jax.devices()[:1])
  compiled = common.lower(b).compile()
  instructions = hlo_instructions(compiled.as_text())
  state, batch = common.init_state(b), common.random_batch(b)
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as scratch:
    trace_dir = pathlib.Path(args.trace_dir or scratch)
    start = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
      for _ in range(args.steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
    wall_s = (time.perf_counter() - start) / args.steps
    events = trace_events(trace_dir)
  timed = attribute(events, instructions, args.steps)
  total_us = sum(timed["by_part"].values())
  top = sorted(timed["by_instruction"].items(), key=lambda kv: -kv[1])[:args.top]
  return {
      "benchmark": "profile_step",
      "environment": common.environment(),
      "config": {"model": {k: getattr(exp.model, k) for k in
                           ("arch", "d_model", "n_layers", "n_heads", "d_ff", "vocab_size",
                            "dtype", "attention_impl")},
                 "batch": exp.train.batch_size, "seq_len": exp.data.seq_len,
                 "steps": args.steps, "warmup": args.warmup, "tiny": args.tiny,
                 "threads": args.threads or "all"},
      "wall_s_per_step": wall_s,
      "thunk_s_per_step": total_us / 1e6,
      # Traced instruction time over wall time: near 1 when the trace sees all the work.
      "coverage": total_us / 1e6 / wall_s,
      "events": len(events),
      "instructions_timed": len(timed["by_instruction"]),
      "parts": {part: {"s_per_step": us / 1e6, "share": us / total_us if total_us else 0.0}
                for part, us in sorted(timed["by_part"].items(), key=lambda kv: -kv[1])},
      "top_instructions": [{"name": name, "opcode": instructions[name][0],
                            "op_name": instructions[name][1], "ms_per_step": us / 1e3}
                           for name, us in top],
  }


def report(result: dict) -> str:
  env = result["environment"]
  rows = [[part, 1e3 * v["s_per_step"], 100 * v["share"]] for part, v in result["parts"].items()]
  top = [[t["name"], t["opcode"], t["ms_per_step"], t["op_name"][-70:]]
         for t in result["top_instructions"]]
  return "\n".join([
      f"profile_step  {env['date']}  {env['backend']} ({env['device_kind']}), load "
      f"{env['load_average_1_5_15']}",
      common.host_line(env),
      f"wall {result['wall_s_per_step']:.4g} s/step (under the profiler); thunk time "
      f"{result['thunk_s_per_step']:.4g} s/step over {result['instructions_timed']} instructions "
      f"(coverage {result['coverage']:.2f}; threads {result['config']['threads']})",
      "",
      common.format_table(["part", "ms/step", "% of thunk time"], rows),
      "",
      common.format_table(["instruction", "opcode", "ms/step", "op_name (end)"], top),
  ])


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.threads:
    common.limit_threads(args.threads)
  result = profile(args)
  print(report(result))
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
