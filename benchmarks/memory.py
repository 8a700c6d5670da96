"""Per-device memory of the train step on 8 simulated devices, by sharding rules and remat policy.

  python benchmarks/memory.py --json=/tmp/memory.json

For each rules preset (dp: data=8; fsdp: data=1,fsdp=8; tp: data=4,tensor=2) and remat policy,
the compiled step's memory analysis (argument, output, temporary bytes per device). For each
rules preset, the bytes of params + optimizer state held by device 0 (the sum of its shards of
an initialised state) against total / 8; the issue's bound under FSDP is <= 1.15 x total / 8.
"""

from __future__ import annotations

import os

# Before jax is imported: the 8 simulated CPU devices this benchmark is about.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_common as common  # noqa: E402

N_DEVICES = 8
MESHES = {"dp": "data=8", "fsdp": "data=1,fsdp=8", "tp": "data=4,tensor=2"}
REMATS = ("none", "full", "dots", "dots_no_batch")
FSDP_BOUND = 1.15
# Tiny, yet wide enough that replicated 1-D parameters (biases, norm scales) stay a small share.
TINY = dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, seq_len=32, batch=8, vocab=512)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_model_flags(p)
  p.add_argument("--rules", default="dp,fsdp,tp", help=f"subset of {','.join(MESHES)}")
  p.add_argument("--remats", default=",".join(REMATS), help=f"subset of {','.join(REMATS)}")
  p.add_argument("--no_init", action="store_true",
                 help="count device 0's state bytes from the shardings instead of initialising")
  args = p.parse_args(argv)
  common.apply_tiny(args, TINY)
  args.rules = [x for x in args.rules.split(",") if x]
  args.remats = [x for x in args.remats.split(",") if x]
  if not args.rules or set(args.rules) - set(MESHES):
    p.error(f"--rules: a subset of {','.join(MESHES)}")
  if not args.remats or set(args.remats) - set(REMATS):
    p.error(f"--remats: a subset of {','.join(REMATS)}")
  return args


def _nbytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


def state_bytes(b: common.Built, init: bool) -> dict:
  """Params + optimizer state: total bytes, and device 0's (its shards, or the sharded shapes)."""
  trees = {"params": (b.abstract_state.params, b.state_shardings.params),
           "opt_state": (b.abstract_state.opt_state, b.state_shardings.opt_state)}
  total = sum(_nbytes(x.shape, x.dtype) for tree, _ in trees.values()
              for x in jax.tree.leaves(tree))
  device0 = b.mesh.devices.flat[0]
  if init:
    state = common.init_state(b)
    arrays = jax.tree.leaves((state.params, state.opt_state))
    per_device = sum(s.data.nbytes for a in arrays for s in a.addressable_shards
                     if s.device == device0)
    del state
  else:
    per_device = sum(_nbytes(sh.shard_shape(x.shape), x.dtype) for tree, shardings in
                     trees.values() for x, sh in zip(jax.tree.leaves(tree),
                                                     jax.tree.leaves(shardings)))
  even = total / N_DEVICES
  return {"total_bytes": total, "device0_bytes": per_device, "total_over_8": even,
          "ratio_to_even_split": per_device / even, "measured_by": "init" if init else "shardings"}


def compiled_memory(b: common.Built) -> dict:
  stats = common.lower(b).compile().memory_analysis()
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {k: int(getattr(stats, k)) for k in keys}


def run(args) -> dict:
  if jax.device_count() < N_DEVICES:
    raise SystemExit(f"memory.py needs {N_DEVICES} devices, jax sees {jax.device_count()}: set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported")
  devices = jax.devices()[:N_DEVICES]
  rows, states = [], {}
  for rules in args.rules:
    for remat in args.remats:
      exp = common.experiment(args, remat=remat, mesh=MESHES[rules], rules=rules)
      b = common.build(exp, devices)
      if rules not in states:
        states[rules] = state_bytes(b, init=not args.no_init)
      rows.append({"rules": rules, "mesh": MESHES[rules], "remat": remat, **compiled_memory(b)})
  batch_bytes = 2 * args.batch * args.seq_len * 4  # tokens + segment ids, int32, global
  exp = common.experiment(args)
  result = {"benchmark": "memory", "environment": common.environment(),
            "config": {"model": dataclasses.asdict(exp.model), "batch": exp.train.batch_size,
                       "seq_len": exp.data.seq_len, "tiny": args.tiny,
                       "global_batch_bytes": batch_bytes},
            "what": "compiled.memory_analysis() of the jitted, donating train step (bytes per "
                    "device); state: params + optimizer state on device 0 vs total / 8",
            "rows": rows, "state": states}
  if "fsdp" in states:
    result["fsdp_bound"] = {"bound": FSDP_BOUND,
                            "ratio": states["fsdp"]["ratio_to_even_split"],
                            "ok": states["fsdp"]["ratio_to_even_split"] <= FSDP_BOUND}
  return result


def report(result: dict) -> str:
  mib = 2.0**20
  header = ["rules", "mesh", "remat", "argument MiB", "output MiB", "temp MiB", "alias MiB"]
  rows = [[r["rules"], r["mesh"], r["remat"], r["argument_size_in_bytes"] / mib,
           r["output_size_in_bytes"] / mib, r["temp_size_in_bytes"] / mib,
           r["alias_size_in_bytes"] / mib] for r in result["rows"]]
  state_rows = [[rules, s["total_bytes"] / mib, s["total_over_8"] / mib, s["device0_bytes"] / mib,
                 s["ratio_to_even_split"], s["measured_by"]]
                for rules, s in result["state"].items()]
  env, m = result["environment"], result["config"]["model"]
  lines = [f"memory  {env['date']}  {env['backend']}, {env['n_devices']} devices",
           f"model: {m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads, d_ff "
           f"{m['d_ff']}, vocab {m['vocab_size']}, seq {result['config']['seq_len']}, batch "
           f"{result['config']['batch']}, {m['dtype']}, scan {m['scan_layers']}", "",
           "compiled memory analysis per device:",
           common.format_table(header, rows), "",
           "params + optimizer state:",
           common.format_table(["rules", "total MiB", "total/8 MiB", "device 0 MiB",
                                "ratio", "from"], state_rows)]
  if "fsdp_bound" in result:
    f = result["fsdp_bound"]
    lines.append(f"\nFSDP: device 0 holds {f['ratio']:.4f} x total/8 "
                 f"(bound {f['bound']}: {'ok' if f['ok'] else 'EXCEEDED'})")
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  result = run(args)
  print(report(result))
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
