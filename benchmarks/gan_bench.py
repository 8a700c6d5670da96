"""The GAN family of train_throughput.py (--model=dcgan): one DCGAN step (the generator and the
discriminator updated together) beside a torch DCGAN of the same shapes.

  python benchmarks/train_throughput.py --model=dcgan --compare=hf-torch --threads=1
  python benchmarks/train_throughput.py --model=dcgan --tiny --compare=hf-torch    # seconds

llmjax's side is its own train step on the `gan` task (tasks/gan.py, models/gan.py, variant
dcgan, BatchNorm in D) with synthetic image info instead of a data read: G maps z (--latent_dim)
through a dense projection to a 4x4 map and 4x4 stride-2 transposed convolutions (--g_widths) to
--image_size images; D halves them with 4x4 stride-2 convolutions (--d_widths) to one logit.
One step: G(z), D(real), D(fake) for D's loss, D(fake) with D held fixed for G's loss; each
network's AdamW (its own clipping: the task's parameter groups) from the one summed loss.
`--compare=hf-torch` trains the torch DCGAN a user writes (nn.Sequential of Linear, Unflatten,
ConvTranspose2d, BatchNorm2d, Conv2d, LeakyReLU: every layer and parameter as llmjax's, NCHW) with
the same losses (binary cross-entropy on the logits, non-saturating G loss), the same
simultaneous update (D's loss back-propagated into D's parameters only, G's into G's only) and
two torch AdamW set as llmjax's groups, starting from llmjax's initial weights and, on the first
step, llmjax's first latents: both first losses are the same number up to float32 rounding.
Later steps draw their latents with each system's own generator. One difference that costs
nothing: torch's D updates its BatchNorm running statistics in all three passes, llmjax's keeps
those of the first two (tasks/gan.py); no loss reads them in training. Defaults: 32x32x3 images (CIFAR
size), z of 100, G widths 256,128,64, D widths 64,128,256, batch 64.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

import bench_common as common
import torch_peers
from llmjax import config as configlib
from llmjax.tasks import gan as gan_task

MODELS = ("dcgan",)
DEFAULTS = dict(image_size=32, batch=64)
TINY = dict(image_size=8, batch=2, latent_dim=8, g_widths="16,8", d_widths="8,16")
FLOP_FORMULA = (
    "train FLOPs/step = (3 x G + 8 x D forward) x batch: G forward, backward (x3); D forward and "
    "backward on the real and on the detached fake batch (x3 each), and forward plus input "
    "gradients on the fake batch for G's loss (x2); forward = 2 x multiply-adds of the dense "
    "projection, every (transposed) convolution (H_in*W_in*16*C_in*C_out for a transposed one, "
    "H_out*W_out*16*C_in*C_out for a convolution) and D's logit. BatchNorm, activations and the "
    "optimizer not counted.")


def add_flags(parser) -> None:
  parser.add_argument("--latent_dim", type=int, default=100, help="--model=dcgan: z's width")
  parser.add_argument("--g_widths", default="256,128,64",
                      help="--model=dcgan: generator channels, smallest map first")
  parser.add_argument("--d_widths", default="64,128,256",
                      help="--model=dcgan: discriminator channels")


def experiment(args) -> configlib.Experiment:
  c = configlib.base_config()
  c.name = "throughput_dcgan"
  c.model = configlib.model_section("gan", dtype=args.dtype)
  c.task.name = "gan"
  c.task.update(dict(variant="dcgan", latent_dim=args.latent_dim, g_widths=args.g_widths,
                     d_widths=args.d_widths, d_norm="batch"))
  c.data.source, c.data.image_size = "mnist_digits", args.image_size  # never read
  c.train.batch_size = args.batch
  c.mesh.update(common.parse_mesh(args.mesh))
  c.mesh.rules = args.rules
  return configlib.resolve(c)


def task(exp, args) -> gan_task.Gan:
  return gan_task.Gan(exp, {"image_shape": [exp.data.image_size, exp.data.image_size, 3]})


def _macs(spec) -> tuple[int, int]:
  """(G's, D's) multiply-adds per image."""
  side, _, channels = spec.image_shape
  base = side // 2 ** len(spec.g_widths)
  g = spec.latent_dim * base * base * spec.g_widths[0]
  for c_in, c_out in zip(spec.g_widths, spec.g_widths[1:] + (channels,)):
    g += base * base * 16 * c_in * c_out
    base *= 2
  d, size = 0, side
  for c_in, c_out in zip((channels,) + spec.d_widths, spec.d_widths):
    size //= 2
    d += size * size * 16 * c_in * c_out
  return g, d + size * size * spec.d_widths[-1]


def flops_per_step(exp, args) -> float:
  g, d = _macs(task(exp, args).spec())
  return 2.0 * (3 * g + 8 * d) * exp.train.batch_size


def describe(exp, args) -> str:
  spec = task(exp, args).spec()
  return (f"model: DCGAN, {exp.data.image_size}x{exp.data.image_size}x3 images, z {spec.latent_dim}, "
          f"G widths {args.g_widths}, D widths {args.d_widths} (BatchNorm), batch "
          f"{exp.train.batch_size}, {exp.model.dtype}; AdamW per network")


def config(exp, args) -> dict:
  return {"task": dataclasses.asdict(exp.task), "optim": dataclasses.asdict(exp.optim),
          "image_size": exp.data.image_size, "channels": 3, "batch": exp.train.batch_size}


def _torch_networks(spec, bn_momentum: float, bn_eps: float):
  """(G, D) as nn.Sequential in torch's NCHW, layer for layer as models/gan.py's dcgan, each
  layer with parameters named as llmjax's (project, bn0, deconv1, ..., out; conv0, bn1, ...)."""
  from collections import OrderedDict
  from torch import nn
  side, _, channels = spec.image_shape
  base, g_w, d_w = side // 2 ** len(spec.g_widths), spec.g_widths, spec.d_widths
  norm = lambda c: nn.BatchNorm2d(c, eps=bn_eps, momentum=1.0 - bn_momentum)  # noqa: E731
  g = [("project", nn.Linear(spec.latent_dim, base * base * g_w[0], bias=False)),
       ("map", nn.Unflatten(1, (g_w[0], base, base))), ("bn0", norm(g_w[0])), ("relu0", nn.ReLU())]
  for i, (c_in, c_out) in enumerate(zip(g_w, g_w[1:]), start=1):
    g += [(f"deconv{i}", nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False)),
          (f"bn{i}", norm(c_out)), (f"relu{i}", nn.ReLU())]
  g += [("out", nn.ConvTranspose2d(g_w[-1], channels, 4, 2, 1)), ("tanh", nn.Tanh())]
  d = []
  for i, (c_in, c_out) in enumerate(zip((channels,) + d_w, d_w)):
    d.append((f"conv{i}", nn.Conv2d(c_in, c_out, 4, 2, 1, bias=i == 0)))
    d += [(f"bn{i}", norm(c_out))] if i else []
    d.append((f"leaky{i}", nn.LeakyReLU(0.2)))
  last = side // 2 ** len(d_w)
  d += [("flat", nn.Flatten()), ("logit", nn.Linear(last * last * d_w[-1], 1))]
  return nn.Sequential(OrderedDict(g)), nn.Sequential(OrderedDict(d))


def _torch_weight(kernel: np.ndarray, module, channels: int) -> np.ndarray:
  """One llmjax kernel in torch's layout (NHWC -> NCHW; a transposed convolution's kernel
  flipped, as lax applies it unflipped and torch as the gradient of a convolution); `channels`:
  those of the map a dense layer writes (G's projection) or reads (D's logit)."""
  kind = type(module).__name__
  if kind == "Conv2d":
    return kernel.transpose(3, 2, 0, 1)
  if kind == "ConvTranspose2d":
    return kernel[::-1, ::-1].transpose(2, 3, 0, 1)
  rows = kernel.shape[0]
  if module.out_features > 1:  # G's projection: z -> an (h, w, c) map there, (c, h, w) here
    return kernel.reshape(rows, -1, channels).transpose(0, 2, 1).reshape(rows, -1).T
  # D's logit reads the flattened last map: (h, w, c) there, (c, h, w) here
  return kernel.reshape(-1, channels, 1).transpose(2, 1, 0).reshape(1, -1)


def torch_state(network, params: dict, channels: int) -> dict:
  """llmjax's parameters of one network -> its torch nn.Sequential's state dict (same names)."""
  out = {}
  for name, p in params.items():
    module = getattr(network, name)
    if "kernel" in p:
      out[f"{name}.weight"] = _torch_weight(p["kernel"], module, channels)
      if "bias" in p:
        out[f"{name}.bias"] = p["bias"]
    else:  # BatchNorm
      out.update({f"{name}.weight": p["scale"], f"{name}.bias": p["bias"]})
  return out


def first_latents(exp) -> np.ndarray:
  """The z of llmjax's first step: its step key (state rng folded with step 0) drawn as Gan.loss."""
  _, state_rng = jax.random.split(jax.random.PRNGKey(0))
  key = jax.random.fold_in(state_rng, 0)
  return np.asarray(jax.random.normal(key, (exp.train.batch_size, exp.task.latent_dim)))


def torch_runner(exp, task, args, seed: int = 0):
  """(run one step, info): the torch DCGAN, llmjax's weights, batch and first latents."""
  import torch
  import torch.nn.functional as F
  threads = torch_peers.set_threads(args.threads, seed)
  spec, m = task.spec(), exp.model
  params = torch_peers.initial_params(task, seed)
  nets = dict(zip(gan_task.GROUPS, _torch_networks(spec, m.bn_momentum, m.bn_eps)))
  channels = {"generator": spec.g_widths[0], "discriminator": spec.d_widths[-1]}
  steps = {}
  for name, net in nets.items():
    state = torch_state(net, params[name], channels[name])
    net.load_state_dict({k: torch_peers.tensor(v) for k, v in state.items()}, strict=False)
    net.train()
    steps[name] = torch_peers.adamw(net.named_parameters(), task.param_groups()[name],
                                    exp.train.steps, lambda name, p: p.ndim >= 2)
  generator, discriminator = nets["generator"], nets["discriminator"]
  images = common.host_batch(task, exp.train.batch_size, seed)["images"]
  real_BCHW = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  z = {"next": torch_peers.tensor(first_latents(exp))}
  info = {"losses": [], "threads": threads, "peer": "torch DCGAN",
          "n_params": sum(p.numel() for net in nets.values() for p in net.parameters())}

  def once():
    for opt, _, _ in steps.values():
      opt.zero_grad(set_to_none=True)
    fake = generator(z["next"])
    real_logits = discriminator(real_BCHW.float() / 127.5 - 1.0)[:, 0]
    d_loss = F.softplus(-real_logits).mean() + F.softplus(
        discriminator(fake.detach())[:, 0]).mean()
    g_loss = F.softplus(-discriminator(fake)[:, 0]).mean()  # non-saturating
    d_loss.backward(inputs=list(discriminator.parameters()))
    g_loss.backward(inputs=list(generator.parameters()))
    for opt, scheduler, clip in steps.values():
      clip()
      opt.step()
      scheduler.step()
    z["next"] = torch.randn(exp.train.batch_size, spec.latent_dim)
    info["losses"].append(float(d_loss.detach() + g_loss.detach()))

  return once, info


FAMILY = common.Family(
    unit="images", tiny=TINY, defaults=DEFAULTS, experiment=experiment, task=task,
    units_per_step=lambda exp, args: exp.train.batch_size, flops_per_step=flops_per_step,
    flop_formula=FLOP_FORMULA, describe=describe, config=config, torch_runner=torch_runner,
    compare_error=lambda args: "")
