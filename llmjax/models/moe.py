"""Mixture-of-experts MLP: a softmax router sends each token to k of E expert MLPs.

The parameters of one sparse layer (a Block's `mlp`), with D = d_model, E = n_experts,
F = the expert width (moe_d_ff, else d_ff), G = the shared width (config.shared_width):

  router/kernel          [D, E]     no bias (Mixtral `gate`, Qwen `mlp.gate`)
  experts/wi             [E, D, F]  up projection (Mixtral w3, Qwen up_proj)
  experts/wg             [E, D, F]  gate projection, gated MLPs only (Mixtral w1, Qwen gate_proj)
  experts/wo             [E, F, D]  down projection (Mixtral w2, Qwen down_proj)
  shared/{wi,wg,wo}/kernel          a dense layers.Mlp of width G (Qwen2-MoE `shared_expert`)
  shared_gate/kernel     [D, 1]     sigmoid gate on the shared output (Qwen2-MoE)

Experts carry no biases; a scanned stack adds a leading layers axis to all of them. Routing is
transformers' (Mixtral, Qwen2-MoE, Qwen3-MoE): logits in the compute dtype, softmax in float32,
top-k, renormalised over the k when `norm_topk_prob`, then the weights cast to the compute dtype.
While applied with the `AUX` collection mutable, each sparse layer sows its Switch load-balancing
loss, router z-loss, per-expert load and dropped fraction (`aux_stats` averages them over layers).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models import layers, moe_a2a, moe_lora
from llmjax.models import peft as peftlib
from llmjax.parallel import axes

AUX = "moe"  # the collection sparse layers sow their statistics into


def has_sparse_layers(model) -> bool:
  """Whether `model` (any llmjax model) has MoE layers, whose statistics a task collects in AUX:
  the model's own config says so, whoever built the task (tests build tasks without a run)."""
  return bool(getattr(getattr(model, "cfg", None), "n_experts", 0))
STATS = ("aux_loss", "z_loss", "load", "dropped")
# The statistics as metric sums (per-weight mean x weight), in STATS' order; the train step also
# logs the scalar ones per step (TRAIN_SUMS), evaluation all of them (the load as a list).
SUMS = ("moe_aux_loss", "moe_z_loss", "moe_load", "moe_dropped")
TRAIN_SUMS = ("moe_aux_loss", "moe_z_loss", "moe_dropped")


def route(logits_TE: jax.Array, k: int, norm_topk: bool):
  """(weights [T, k] float32, experts [T, k] int32, probabilities [T, E] float32); any leading
  dims in place of T."""
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  weights_TK, experts_TK = jax.lax.top_k(probs_TE, k)
  if norm_topk:
    weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
  return weights_TK, experts_TK.astype(jnp.int32), probs_TE


def balance_loss(probs_TE: jax.Array, experts_TK: jax.Array) -> jax.Array:
  """Switch load balancing: E * sum_e (top-k picks of e / T) * mean router probability of e."""
  n_experts = probs_TE.shape[-1]
  picks_E = jnp.sum(jax.nn.one_hot(experts_TK, n_experts, dtype=jnp.float32), axis=(0, 1))
  return n_experts * jnp.sum(picks_E / probs_TE.shape[0] * jnp.mean(probs_TE, axis=0))


def z_loss(logits_TE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: the mean squared log-partition of the router logits."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def capacity(factor: float, length: int, k: int, n_experts: int) -> int:
  """Slots per expert in a row of `length` tokens: ceil(factor * length * k / E)."""
  return max(1, math.ceil(factor * length * k / n_experts))


def capacity_slots(experts_BLK: jax.Array, n_experts: int, slots: int):
  """(slot one-hot [B, L, K, E, C], kept [B, L, K]) of the capacity rule.

  Within a row, expert e serves its picks in order: every token's first choice (by position)
  before any second choice, and so on; a pick whose place in that queue is >= `slots` is dropped.
  """
  batch, length, k = experts_BLK.shape
  picks_BLKE = jax.nn.one_hot(experts_BLK, n_experts, dtype=jnp.int32)
  picks_BQE = jnp.transpose(picks_BLKE, (0, 2, 1, 3)).reshape(batch, k * length, n_experts)
  place_BQE = jnp.cumsum(picks_BQE, axis=1) - 1
  place_BLKE = jnp.transpose(place_BQE.reshape(batch, k, length, n_experts), (0, 2, 1, 3))
  place_BLK = jnp.sum(place_BLKE * picks_BLKE, axis=-1)
  kept_BLK = place_BLK < slots
  slot_BLKC = jax.nn.one_hot(jnp.where(kept_BLK, place_BLK, slots), slots, dtype=jnp.float32)
  return picks_BLKE.astype(jnp.float32)[..., None] * slot_BLKC[..., None, :], kept_BLK


class Experts(nn.Module):
  """E expert MLPs as stacked kernels; applied grouped (dropless) or on capacity slots; LoRA on
  the projections `peft` targets (models/moe_lora.py)."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE

  def setup(self):
    cfg = self.cfg
    e, d, f = cfg.n_experts, cfg.d_model, cfg.expert_d_ff
    dtype = layers.dtype_of(cfg.param_dtype)
    in_axes, out_axes = (axes.EXPERT, axes.EMBED, axes.MLP), (axes.EXPERT, axes.MLP, axes.EMBED)
    self.wi = self.param("wi", layers.init_normal(cfg.init_std, in_axes), (e, d, f), dtype)
    if cfg.mlp in layers.GATED:
      self.wg = self.param("wg", layers.init_normal(cfg.init_std, in_axes), (e, d, f), dtype)
    std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.wo = self.param("wo", layers.init_normal(std, out_axes), (e, f, d), dtype)
    shapes = {"wi": (e, d, f), "wg": (e, d, f), "wo": (e, f, d)}
    names = moe_lora.targets(self.peft, self.path, [n for n in shapes if hasattr(self, n)])
    self.lora_on = names
    if names:
      self.lora = moe_lora.ExpertsLora(
          self.peft, {n: shapes[n] for n in names},
          {n: out_axes if n == "wo" else in_axes for n in names}, cfg.param_dtype, name="lora")

  def _kernels(self):
    compute = layers.dtype_of(self.cfg.dtype)
    gate = self.wg.astype(compute) if self.cfg.mlp in layers.GATED else None
    return self.wi.astype(compute), gate, self.wo.astype(compute)

  def _hidden(self, up, gate):
    return hidden(self.cfg, up, gate)

  def _lora_scale(self) -> float:
    return self.peft.lora_scale() if self.lora_on else 0.0

  def tensors(self) -> dict:
    """Every stacked tensor of the experts (expert dim first): kernels and LoRA factors."""
    kernels = {n: getattr(self, n) for n in ("wi", "wg", "wo") if hasattr(self, n)}
    return {"kernels": kernels, "lora": {n: self.lora.factors[n] for n in self.lora_on}}

  def grouped(self, x_ND: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """Rows sorted by expert, `sizes_E` of them per expert -> each row through its expert."""
    return grouped_rows(self.cfg, self._lora_scale(), self.tensors(), x_ND, sizes_E)

  def all_to_all(self, x_BLD, experts_BLK, weights_BLK, axis: str) -> jax.Array:
    """Dropless with the experts split over mesh axis `axis`: tokens travel by all-to-all."""
    run = functools.partial(grouped_rows, self.cfg, self._lora_scale())
    return moe_a2a.dropless_all_to_all(run, self.tensors(), x_BLD, experts_BLK, weights_BLK,
                                       self.cfg.n_experts, axis)

  def slotted(self, x_BECD: jax.Array) -> jax.Array:
    """Each expert's capacity slots [B, E, C, D] through that expert."""
    wi, wg, wo = self._kernels()
    x_BECD = x_BECD.astype(wi.dtype)

    def project(name, x, kernel):
      y = jnp.einsum("BECI,EIO->BECO", x, kernel)
      return y + self.lora.slotted(name, x) if name in self.lora_on else y
    gate_BECF = project("wg", x_BECD, wg) if wg is not None else None
    h_BECF = self._hidden(project("wi", x_BECD, wi), gate_BECF)
    h_BECF = nn.with_logical_constraint(h_BECF, _SLOTS[:3] + (axes.ACT_MLP,))
    return project("wo", h_BECF, wo)

  def __call__(self, x_ND, sizes_E):
    return self.grouped(x_ND, sizes_E)


def hidden(cfg: ModelConfig, up, gate):
  """An expert's hidden units from its up (and gate) projections."""
  act = layers.ACTIVATIONS[cfg.mlp]
  return act(gate) * up if gate is not None else act(up)


def grouped_rows(cfg: ModelConfig, lora_scale: float, tensors: dict, x_ND, sizes_E):
  """Rows sorted by expert -> each through its expert, given the experts' stacked tensors
  (`Experts.tensors`: all of them, or one device's share under expert parallelism)."""
  compute = layers.dtype_of(cfg.dtype)
  kernels = {n: w.astype(compute) for n, w in tensors["kernels"].items()}
  x_ND = x_ND.astype(compute)

  def project(name, x):
    y = jax.lax.ragged_dot(x, kernels[name], sizes_E)
    if name in tensors["lora"]:
      y = y + moe_lora.grouped_update(tensors["lora"][name], lora_scale, x, sizes_E)
    return y
  gate_NF = project("wg", x_ND) if "wg" in kernels else None
  return project("wo", hidden(cfg, project("wi", x_ND), gate_NF))


# Tokens in expert slots: the expert dim over the expert mesh axis (an all-to-all away from the
# batch-sharded tokens under the *_ep rules), the batch over the remaining batch axes.
_SLOTS = (axes.EXPERT_BATCH, axes.ACT_EXPERT, None, axes.ACT_EMBED)
_LOCAL_SLOTS = (axes.BATCH, None, None, axes.ACT_EMBED)


def dropless(experts: Experts, x_TD, experts_TK, weights_TK) -> jax.Array:
  """Every pick served: rows sorted by expert, one grouped matmul per projection, unsorted."""
  tokens, k = experts_TK.shape
  flat_N = experts_TK.reshape(-1)
  order_N = jnp.argsort(flat_N, stable=True)
  sizes_E = jnp.bincount(flat_N, length=experts.cfg.n_experts).astype(jnp.int32)
  y_ND = experts.grouped(x_TD[order_N // k], sizes_E)
  # explicit width: -1 cannot be inferred for zero tokens (an empty generate batch)
  y_TKD = jnp.zeros_like(y_ND).at[order_N].set(y_ND).reshape(tokens, k, y_ND.shape[-1])
  return jnp.einsum("TKD,TK->TD", y_TKD, weights_TK.astype(y_TKD.dtype))


def with_capacity(experts: Experts, x_BLD, experts_BLK, weights_BLK, slots: int):
  """Dispatch into `slots` per expert and row by einsum, combine back; (y [B, L, D], kept)."""
  slot_BLKEC, kept_BLK = capacity_slots(experts_BLK, experts.cfg.n_experts, slots)
  dtype = x_BLD.dtype
  dispatch_BLEC = jnp.sum(slot_BLKEC, axis=2).astype(dtype)
  combine_BLEC = jnp.einsum("BLKEC,BLK->BLEC", slot_BLKEC, weights_BLK).astype(dtype)
  # Dispatched where the tokens are (batch-sharded), then moved to their experts: two constraints
  # that differ only in which dim the expert mesh axis splits, which XLA lowers to an all-to-all.
  x_BECD = nn.with_logical_constraint(jnp.einsum("BLD,BLEC->BECD", x_BLD, dispatch_BLEC),
                                      _LOCAL_SLOTS)
  y_BECD = experts.slotted(nn.with_logical_constraint(x_BECD, _SLOTS))
  y_BECD = nn.with_logical_constraint(nn.with_logical_constraint(y_BECD, _SLOTS), _LOCAL_SLOTS)
  y_BLD = jnp.einsum("BECD,BLEC->BLD", y_BECD, combine_BLEC)
  return y_BLD, kept_BLK


class MoeMlp(nn.Module):
  """Router + experts (+ shared experts): x [B, L, D] -> [B, L, D]."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.cfg
    batch, length, d = x_BLD.shape
    k, n_experts = cfg.experts_per_token, cfg.n_experts
    router_in_BLD = x_BLD
    if cfg.router_jitter and not self.deterministic:  # Switch's multiplicative input noise
      noise = jax.random.uniform(self.make_rng("dropout"), x_BLD.shape, jnp.float32,
                                 1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
      router_in_BLD = (x_BLD * noise).astype(x_BLD.dtype)
    logits_BLE = layers.dense(cfg, n_experts, (axes.EMBED, None), "router", bias=False,
                              peft=self.peft, deterministic=self.deterministic)(router_in_BLD)
    # Routed per row (no reshape across the batch-sharded dim, which would gather the logits).
    weights_BLK, experts_BLK, probs_BLE = route(logits_BLE, k, cfg.norm_topk_prob)
    experts = Experts(cfg, self.peft, name="experts")
    if cfg.moe_capacity_factor > 0:
      slots = capacity(cfg.moe_capacity_factor, length, k, n_experts)
      y_BLD, kept_BLK = with_capacity(experts, x_BLD, experts_BLK, weights_BLK, slots)
      dropped = 1.0 - jnp.mean(kept_BLK.astype(jnp.float32))
    elif (axis := moe_a2a.expert_axis(n_experts, batch)) is not None:
      y_BLD = experts.all_to_all(x_BLD, experts_BLK, weights_BLK, axis)
      dropped = jnp.zeros((), jnp.float32)
    else:
      y_BLD = dropless(experts, x_BLD.reshape(-1, d), experts_BLK.reshape(-1, k),
                       weights_BLK.reshape(-1, k)).reshape(x_BLD.shape)
      dropped = jnp.zeros((), jnp.float32)
    logits_TE = logits_BLE.reshape(batch * length, n_experts)
    probs_TE, experts_TK = probs_BLE.reshape(-1, n_experts), experts_BLK.reshape(-1, k)
    y_BLD = y_BLD.astype(layers.dtype_of(cfg.dtype))
    if cfg.shared_width:
      shared = layers.Mlp(_shared_cfg(cfg), self.peft, self.deterministic, name="shared")(x_BLD)
      if cfg.shared_expert_gate:
        gate_BL1 = layers.dense(cfg, 1, (axes.EMBED, None), "shared_gate", bias=False)(x_BLD)
        shared = jax.nn.sigmoid(gate_BL1) * shared
      y_BLD = y_BLD + shared
    if not self.is_initializing():
      load_E = jnp.mean(jax.nn.one_hot(experts_TK, n_experts, dtype=jnp.float32), axis=(0, 1))
      for name, value in zip(STATS, (balance_loss(probs_TE, experts_TK), z_loss(logits_TE),
                                     load_E, dropped)):
        self.sow(AUX, name, value)
    return nn.with_logical_constraint(y_BLD, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


def _shared_cfg(cfg: ModelConfig) -> ModelConfig:
  return dataclasses.replace(cfg, d_ff=cfg.shared_width)


def aux_stats(sown: dict) -> dict:
  """The sown statistics of every sparse layer -> their means over layers (load: [E])."""
  found = {name: [] for name in STATS}
  for path, leaf in jax.tree_util.tree_leaves_with_path(sown or {}):
    names = [getattr(p, "key", None) for p in path]
    name = next((n for n in names if n in found), None)
    if name is not None:
      value = jnp.asarray(leaf, jnp.float32)
      # A scanned stack stacks its layers on axis 0; the load keeps its expert axis last.
      found[name].append(value.reshape((-1,) + value.shape[value.ndim - (name == "load"):]))
  if not found["aux_loss"]:
    return {}
  return {name: jnp.mean(jnp.concatenate(values, axis=0), axis=0)
          for name, values in found.items()}
