"""What a compiled step says about itself on a TPU: per-device memory against the chip's HBM, the
compiler's cost model against the chip's roofline, and the collectives in its HLO.

Everything here reads a compiled executable (or the compiler's out-of-memory refusal) and the
chip table of `llmjax.parallel.topology`; nothing runs a step.
"""

from __future__ import annotations

import collections
import math
import re

import jax
import numpy as np

from llmjax.parallel.topology import GIB, Chip

# Collective ops by kind; an async pair (-start/-done) counts once, at its start.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES)
                 + r")(-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation|"
                    r"branch_computations)=(?:\{([^}]*)\}|%?([\w.\-]+))")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# A loop counter's bound: XLA:TPU's layer loops count in s32, its windowed einsums in u32.
_INT_CONSTANT = re.compile(r"=\s*[su](?:32|64)\[\](?:\{[^}]*\})?\s+constant\((\d+)\)")
# XLA:TPU runs an async collective as a start (flag_start -1) and continuation/done fusions that
# carry the same op (same channel) forward, often inside a loop the transfer overlaps with: one
# transfer, counted at its start only.
_INST = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CONTINUATION = re.compile(r'"async_collective_fusion_config":\{"flag_start":"(?!-1")')


def memory(stats, hbm_bytes: int) -> dict:
  """Per-device bytes from `memory_analysis()`; peak = arguments + outputs - aliased +
  temporaries + generated code (what must sit in HBM at once)."""
  out = {"arguments": int(stats.argument_size_in_bytes),
         "outputs": int(stats.output_size_in_bytes),
         "aliased": int(stats.alias_size_in_bytes),
         "temporaries": int(stats.temp_size_in_bytes),
         "generated_code": int(stats.generated_code_size_in_bytes)}
  out["peak"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                 + out["generated_code"])
  out["hbm"] = hbm_bytes
  return out


_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit])


def exhausted(message: str, hbm_bytes: int) -> dict | None:
  """The numbers in the compiler's RESOURCE_EXHAUSTED refusal (None for any other error)."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  text = " ".join(message.split())
  out = {"hbm": hbm_bytes, "error": text[:600]}
  used = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", text)
  over = re.search(r"\(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)", text)
  found = used or over
  if found:
    out["peak"] = _bytes(*found.group(1, 2))
    out["available"] = _bytes(*found.group(3, 4))
  total = re.search(r"Total hbm usage >= " + _SIZE, text)
  if total:
    out["peak"] = max(out.get("peak", 0), _bytes(*total.group(1, 2)))
  for name in ("arguments", "temporaries", "program", "reserved", "outputs"):
    part = re.search(r"\b" + name + r":?\s+" + _SIZE, text)
    if part:
      out[name] = _bytes(*part.group(1, 2))
  return out


def cost(compiled) -> dict:
  """The compiler's cost model of the partitioned (per-device) program."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  out = {"flops": float(analysis.get("flops", 0.0)),
         "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}
  optimal = analysis.get("optimal_seconds")
  if optimal is not None and optimal > 0:  # the TPU model reports a negative value when unsure
    out["optimal_seconds"] = float(optimal)
  return out


def roofline(costs: dict, mem: dict, chip: Chip, model_flops: float | None) -> dict:
  """Lower bounds on a step's time from FLOPs and HBM traffic, and the MFU they cap.

  XLA's cost analysis counts a loop body once (a scan over layers: one layer), so each bound
  takes the larger of the compiler's count and one that holds regardless: the model's FLOPs
  (the count MFU uses; recomputation excluded) and the bytes of the arguments read and the
  outputs written once. MFU's bound is then model FLOPs / (peak x the slower bound).
  """
  flops = max(costs["flops"], model_flops or 0.0)
  traffic = max(costs["bytes_accessed"], mem["arguments"] + mem["outputs"])
  compute_s, memory_s = flops / chip.bf16_flops, traffic / chip.hbm_bytes_per_s
  out = {"compute_s": compute_s, "memory_s": memory_s,
         "bound": "compute" if compute_s >= memory_s else "memory"}
  step_s = max(compute_s, memory_s, costs.get("optimal_seconds", 0.0))
  out["step_s_lower_bound"] = step_s
  counted = model_flops if model_flops is not None else costs["flops"]
  out["mfu_upper_bound"] = counted / (chip.bf16_flops * step_s) if step_s > 0 else None
  return out


def _shape_bytes(text: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _result_bytes(shape: str, kind: str, is_start: bool) -> float:
  """Bytes a collective produces; an async start's tuple holds its operand(s) first."""
  if is_start and kind in ("all-gather", "collective-permute") and shape.startswith("("):
    arrays = [m.group(0) for m in _ARRAY.finditer(shape) if m.group(1) in _DTYPE_BYTES]
    half = [a for a in arrays if a.split("[")[1] != "]"]  # drop scalar sync flags
    return _shape_bytes(" ".join(half[len(half) // 2:]))
  return _shape_bytes(shape)


def collectives(hlo_text: str) -> dict:
  """{kind: {"count", "bytes"}} per step: ops inside a loop body count once per iteration.

  XLA:TPU writes a reduce-scatter as a fusion calling an `all-reduce-scatter` computation (an
  all-reduce inside): counted as a reduce-scatter of that computation's result. Its async
  collectives' continuation fusions repeat the op they carry on: counted at the start only.
  """
  ops, edges, entry, loops = _read_hlo(hlo_text)
  trips = {cond: count for cond, count in loops["constants"].items()}
  times = _multipliers(edges, entry, trips)
  out = {}
  for name, found in ops.items():
    scatter = name.startswith("all-reduce-scatter")
    for kind, size in found:
      if scatter:
        kind, size = "reduce-scatter", loops["results"].get(name, size)
      entry_ = out.setdefault(kind, {"count": 0, "bytes": 0})
      entry_["count"] += times.get(name, 1)
      entry_["bytes"] += int(size * times.get(name, 1))
  return out


def _read_hlo(hlo_text: str):
  """(collective ops by computation, call edges, the entry, loop facts) of an HLO module."""
  ops, edges = collections.defaultdict(list), collections.defaultdict(list)
  current, entry = "?", None
  loops = {"constants": {}, "results": {}}
  insts, whiles = collections.defaultdict(dict), []
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and not line.startswith(" "):
      current = head.group(1)
      entry = current if line.startswith("ENTRY") else entry
      result = line.rsplit("->", 1)[-1] if "->" in line else ""
      loops["results"][current] = _shape_bytes(result)
      continue
    inst = _INST.match(line)
    if inst:
      insts[current][inst.group(2)] = inst.group(3)
      if inst.group(1):
        insts[current][""] = inst.group(2)
    op = _OP.match(line)
    if op and not _CONTINUATION.search(line):
      ops[current].append((op.group(2), _result_bytes(op.group(1), op.group(2),
                                                      bool(op.group(3)))))
    known = _TRIP.search(line)
    called = {m.group(1): (m.group(2) or m.group(3)) for m in _CALLS.finditer(line)}
    if "condition" in called and "body" in called:
      whiles.append((called["condition"].strip().lstrip("%"), called["body"].strip().lstrip("%")))
    for role, names in called.items():
      for name in names.split(","):
        edges[current].append((name.strip().lstrip("%"), role, called.get("condition"),
                               int(known.group(1)) if known else None))
  for condition, body in whiles:
    trips = _trips(insts[condition], insts[body])
    if trips is not None:
      loops["constants"][condition] = trips
  return ops, edges, entry, loops


def _constant(insts: dict, name: str) -> int | None:
  found = _INT_CONSTANT.search("= " + insts.get(name, ""))
  return int(found.group(1)) if found else None


def _trips(condition: dict, body: dict) -> int | None:
  """A loop's trip count from its condition `i < N` and its body's `i = i + k` (i from 0:
  XLA:TPU's windowed einsums step by 2); else the one integer constant the condition holds."""
  found = re.search(r"\bcompare\(([^)]*)\).*direction=LT", condition.get(condition.get(""), ""))
  if found:
    operands = re.findall(r"%([\w.\-]+)", found.group(1))
    if len(operands) == 2:
      index = re.search(r"get-tuple-element\(.*index=(\d+)", condition.get(operands[0], ""))
      limit = _constant(condition, operands[1])
      if index and limit is not None:
        return -(-limit // _step(body, int(index.group(1))))
  values = [v for v in (_constant(condition, n) for n in condition if n) if v is not None]
  return values[0] if len(values) == 1 else None


def _step(body: dict, index: int) -> int:
  """What a loop body adds to the counter at tuple `index` each iteration (1 unless a constant
  says otherwise)."""
  root = re.search(r"\btuple\((.*)\)", body.get(body.get(""), ""))
  names = re.findall(r"%([\w.\-]+)", root.group(1)) if root else []
  update = body.get(names[index], "") if index < len(names) else ""
  added = re.search(r"\badd\(([^)]*)\)", update)
  steps = [_constant(body, n) for n in re.findall(r"%([\w.\-]+)", added.group(1))] if added else []
  steps = [k for k in steps if k]
  return steps[0] if steps else 1


def _multipliers(edges: dict, entry: str | None, bounds: dict) -> dict:
  """How many times each computation runs per call of the entry (loop trip counts multiplied:
  the compiler's known trip count, else the one read from the loop's condition and body)."""
  times = {entry: 1} if entry else {}
  stack = [entry] if entry else []
  while stack:
    name = stack.pop()
    for callee, role, condition, known in edges.get(name, ()):
      repeat = 1
      if role == "body":
        repeat = known or bounds.get((condition or "").strip().lstrip("%"), 1)
      count = times[name] * repeat
      if times.get(callee, 0) < count:
        times[callee] = count
        stack.append(callee)
  return times


def state_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a sharded tree (the largest shard of each leaf)."""
  leaves = jax.tree.leaves(jax.tree.map(
      lambda a, s: int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize,
      abstract_tree, shardings))
  return int(sum(leaves))


def gib(n: float | None) -> str:
  return "-" if n is None else f"{n / GIB:.2f}"


def table(report: dict) -> str:
  """The report as a fixed-width table: one row per compiled step."""
  head = (f"{'step':8} {'fits':4} {'peak GiB':>9} {'HBM GiB':>8} {'args':>7} {'temps':>7} "
          f"{'compile s':>9} {'TFLOP/dev':>9} {'bound':>7} {'MFU<=':>6} {'coll. GiB':>9}")
  lines = [f"{report['topology']} ({report['devices']} devices, chip {report['chip']}, "
           f"mesh {report['mesh']}, rules {report['rules']})", head]
  for name, step in report["steps"].items():
    mem, roof = step["memory"], step.get("roofline", {})
    mfu = roof.get("mfu_upper_bound")
    coll = sum(c["bytes"] for c in step.get("collectives", {}).values())
    lines.append(
        f"{name:8} {'yes' if step['fits'] else 'NO':4} {gib(mem.get('peak')):>9} "
        f"{gib(mem['hbm']):>8} {gib(mem.get('arguments')):>7} {gib(mem.get('temporaries')):>7} "
        f"{step['compile_s']:>9.1f} {step.get('cost', {}).get('flops', 0) / 1e12:>9.3f} "
        f"{roof.get('bound', '-'):>7} {'-' if mfu is None else f'{mfu:.1%}':>6} "
        f"{gib(coll) if 'collectives' in step else '-':>9}")
  return "\n".join(lines)
