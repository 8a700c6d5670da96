"""Ahead-of-time compilation of a run's steps for a TPU topology (`llmjax compile`), on any host.

The run is assembled exactly as `llmjax train` assembles it (`setup.prepare` and
`setup.compile_steps`: the same task, mesh and rules, shardings, donation, remat, scan,
fine-tuning split and optimizer), over libtpu's abstract devices of the topology, from abstract
state (shapes and shardings: no weight is allocated). Its train and eval steps, and for a causal
decoder `generate`'s prefill and one decode step through the KV cache, are lowered and compiled
with the TPU compiler; `aot_report` reads what each compiled step says about itself.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
from flax import linen as nn

from llmjax import finetune, tasks
from llmjax.config import Experiment
from llmjax.errors import ConfigError
from llmjax.generate import cached_forward, causal_decoder, init_cache
from llmjax.models import attention
from llmjax.parallel import sharding, topology
from llmjax.train import aot_report, init, setup

# Exit codes of `llmjax compile`: 0 every step fits, 3 one compiles but does not fit (2 is bad
# input, as for every verb).
DOES_NOT_FIT = 3


@dataclasses.dataclass(frozen=True)
class Options:
  """What `llmjax compile` is asked besides the experiment."""
  topology: str
  num_slices: int = 1
  prompt_len: int = 0  # generate's prompt; 0: half of config.data.seq_len
  max_new_tokens: int = 0  # 0: the rest of config.data.seq_len
  steps: tuple = ("train", "eval", "prefill", "decode")


def with_slices(exp: Experiment, num_slices: int) -> Experiment:
  """`exp` over `num_slices` slices (config.mesh.dcn), refusing a conflicting setting."""
  if exp.mesh.dcn not in (1, num_slices):
    raise ConfigError(f"config.mesh.dcn={exp.mesh.dcn} but --num_slices={num_slices}; give "
                      "one of them (or the same number)")
  return dataclasses.replace(exp, mesh=dataclasses.replace(exp.mesh, dcn=num_slices))


def abstract(tree, shardings):
  """ShapeDtypeStructs carrying their shardings: what `lower` needs, with nothing allocated."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def assemble(exp: Experiment, options: Options):
  """(topology, the run's Setup over the topology's abstract devices)."""
  topo = topology.parse(options.topology)
  exp = with_slices(exp, options.num_slices)
  devices = topology.devices(topo, options.num_slices)
  return topo, setup.prepare(exp, None, devices=devices)


def lowered_steps(s: setup.Setup, options: Options) -> dict:
  """{name: a thunk giving the lowered step}: train and eval as the loop jits them, and the
  generate steps of a causal decoder."""
  state = abstract(s.abstract_state, s.state_shardings)
  batch = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.batch_sharding(s.mesh)),
      s.task.example_batch(s.exp.train.batch_size))
  train_fn, eval_fn = setup.compile_steps(s)
  thunks = {"train": lambda: train_fn.lower(state, batch),
            "eval": lambda: eval_fn.lower(state, batch)}
  if causal_decoder(s.model) and tasks.supports(s.task, tasks.CountsFlops):
    thunks.update(_generate_steps(s, options, state))
  return {name: thunks[name] for name in options.steps if name in thunks}


def _generate_steps(s: setup.Setup, options: Options, state) -> dict:
  """Prefill of a [batch, prompt] prompt into a fresh cache, and one decode step after it."""
  seq = s.exp.data.seq_len
  prompt = options.prompt_len or max(seq // 2, 1)
  new = options.max_new_tokens or max(seq - prompt, 1)
  rows = s.exp.train.batch_size
  params = finetune.merge(state.params, state.frozen)
  batch_sharding = sharding.batch_sharding(s.mesh)
  tokens = jax.ShapeDtypeStruct((rows, prompt), jax.numpy.int32, sharding=batch_sharding)
  model = s.model

  def prefill(params, tokens_BP):
    cache = init_cache(model, rows, prompt + new)
    positions_BP = jax.numpy.broadcast_to(jax.numpy.arange(prompt), tokens_BP.shape)
    return cached_forward(model, params, tokens_BP, positions_BP, jax.numpy.ones_like(tokens_BP),
                          cache, prefill=True)

  def decode(params, token_B1, position_B1, cache):
    return cached_forward(model, params, token_B1, position_B1, jax.numpy.ones_like(token_B1),
                          cache)

  prefill_jit = jax.jit(prefill)
  cache_shapes = jax.eval_shape(functools.partial(init_cache, model, rows, prompt + new))
  one = jax.ShapeDtypeStruct((rows, 1), jax.numpy.int32, sharding=batch_sharding)

  prefill_lowered = _Once(lambda: prefill_jit.lower(params, tokens))

  def decode_lowered():
    # The cache keeps the layout the compiled prefill gave it (its output shardings).
    cache_shardings = prefill_lowered().compile().output_shardings[1]
    cache = abstract(cache_shapes, cache_shardings)
    return jax.jit(decode, donate_argnums=3).lower(params, one, one, cache)

  return {"prefill": prefill_lowered, "decode": decode_lowered}


class _Once:
  """A lowering thunk whose compilation runs once however often it is asked for."""

  def __init__(self, lower):
    self.lower, self.compiled = lower, None

  def __call__(self):
    return self

  def compile(self):
    if self.compiled is None:
      self.compiled = self.lower().compile()
    return self.compiled


def compile_step(thunk, topo: topology.Topology, model_flops: float | None) -> dict:
  """Lower and compile one step; its memory (or the compiler's refusal), cost, collectives."""
  start = time.perf_counter()
  hbm = topo.chip.hbm_bytes
  try:
    compiled = thunk().compile()
  except jax.errors.JaxRuntimeError as e:
    refused = aot_report.exhausted(str(e), hbm)
    if refused is None:
      raise
    return {"fits": False, "compile_s": time.perf_counter() - start, "memory": refused}
  out = {"compile_s": time.perf_counter() - start,
         "memory": aot_report.memory(compiled.memory_analysis(), hbm)}
  out["fits"] = out["memory"]["peak"] <= hbm
  out["cost"] = aot_report.cost(compiled)
  out["model_flops"] = model_flops
  out["roofline"] = aot_report.roofline(out["cost"], out["memory"], topo.chip, model_flops)
  out["collectives"] = aot_report.collectives(compiled.as_text())
  return out


def model_flops_per_device(s: setup.Setup) -> float | None:
  """The task's count of a train step's FLOPs (as MFU counts them), per device."""
  if not tasks.supports(s.task, tasks.CountsFlops):
    return None
  params = init.param_shapes(s.init_variables) if s.trainable is not None else None
  per_example = s.task.train_flops_per_example(params, s.trainable)
  return s.exp.train.batch_size * per_example / s.mesh.size


def compile_run(exp: Experiment, options: Options) -> dict:
  """The report of `llmjax compile`: every step's memory, fit, cost, roofline, collectives."""
  topo, s = assemble(exp, options)
  state = abstract(s.abstract_state, s.state_shardings)
  params = finetune.merge(state.params, state.frozen)
  report = {"topology": topo.name, "topology_name": topo.topology_name, "chip": topo.chip.name,
            "chip_datasheet": dataclasses.asdict(topo.chip), "num_slices": options.num_slices,
            "devices": s.mesh.size, "mesh": dict(s.mesh.shape), "rules": s.exp.mesh.rules,
            "experiment": s.exp.name, "attention_impl": s.exp.model.attention_impl,
            "per_device_state_bytes": {
                "params": aot_report.state_bytes(params, finetune.merge(
                    s.state_shardings.params, s.state_shardings.frozen)),
                "trainable_params": aot_report.state_bytes(state.params,
                                                           s.state_shardings.params),
                "opt_state": aot_report.state_bytes(state.opt_state,
                                                    s.state_shardings.opt_state)},
            "steps": {}}
  flops = model_flops_per_device(s)
  # attention_impl="auto" resolves for the TPU, as it would on the pod, not for this host.
  target = attention.TARGET_PLATFORM.set("tpu")
  try:
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      for name, thunk in lowered_steps(s, options).items():
        report["steps"][name] = compile_step(thunk, topo, flops if name == "train" else None)
  finally:
    attention.TARGET_PLATFORM.reset(target)
  report["fits"] = all(step["fits"] for step in report["steps"].values())
  return report


def parameter_shardings(lowered) -> list[tuple]:
  """Each entry argument's sharding in a lowered step, as mesh axes per dimension
  (`[{}, {"fsdp"}]` -> ((), ("fsdp",))), in argument order."""
  text = lowered.as_text()
  head = text[text.index("func.func public @main("):]
  head = head[:head.index(") -> ")]
  out = []
  for arg in head.split("%arg")[1:]:
    found = re.search(r"#sdy.sharding<@\w+, \[(.*?)\]", arg)
    dims = re.findall(r"\{([^{}]*)\}", found.group(1)) if found else []
    out.append(tuple(tuple(re.findall(r'"(\w+)"', d)) for d in dims))
  return out


def spec_axes(named_sharding, ndim: int) -> tuple:
  """A NamedSharding's PartitionSpec as mesh axes per dimension, like `parameter_shardings`."""
  spec = tuple(named_sharding.spec) + (None,) * (ndim - len(named_sharding.spec))
  return tuple(() if p is None else (p,) if isinstance(p, str) else tuple(p) for p in spec)
