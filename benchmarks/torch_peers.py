"""What the torch peers of the newer benchmark families share: llmjax's initial parameters read on
the host, and torch's AdamW set up as llmjax's optimiser (same hyper-parameters, warmup + cosine
schedule, global-norm clipping and decay mask).

torch is imported inside the functions only: importing this module costs nothing without
--compare=hf-torch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import linen as nn

from llmjax.train import init, optim


def initial_params(task, seed: int = 0) -> dict:
  """The parameters llmjax's train step starts from (init.init_state's seed split), as numpy."""
  params_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  variables = init.variables_init(task, task.model(), task.example_batch(1))(
      {"params": params_rng, "dropout": params_rng})
  return jax.tree.map(np.asarray, nn.unbox(variables["params"]))


def set_threads(threads: int = 0, seed: int = 0) -> int:
  """torch's threads as the process's pinning (--threads, else every CPU); a fixed seed. Every
  benchmark's torch peer starts here."""
  import torch
  threads = threads or os.cpu_count()
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  return threads


def tensor(array):
  import torch
  return torch.from_numpy(np.array(array, np.float32))  # a writable copy


def adamw(named_params, o, steps: int, decays):
  """(optimizer, scheduler, clip): torch AdamW with llmjax's settings `o` (config.optim) and its
  schedule's values read once on the host; `decays(name, param)` says whether weight decay
  applies (llmjax: matrices only, never biases, norm scales or embeddings)."""
  import torch
  decay, no_decay = [], []
  for name, param in named_params:
    (decay if decays(name, param) else no_decay).append(param)
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  lrs = np.asarray(jax.vmap(optim.learning_rate_schedule(o, steps))(np.arange(steps + 1)))
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda i: float(lrs[min(i, len(lrs) - 1)]) / o.lr)
  params = decay + no_decay

  def clip():
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, o.grad_clip)

  return opt, scheduler, clip


def train_step(loss_fn, opt, scheduler, clip, info: dict):
  """One torch step as a closure: zero grads, loss_fn() -> loss, backward, clip, update."""
  def once():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    clip()
    opt.step()
    scheduler.step()
    info["losses"].append(float(loss.detach()))  # CPU torch is synchronous: the step is done

  return once
