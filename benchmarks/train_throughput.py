"""Train-step throughput: tokens/s or images/s, achieved FLOP/s and MFU against two ceilings.

  python benchmarks/train_throughput.py --compare=hf-torch --json=/tmp/throughput.json
  python benchmarks/train_throughput.py --compare=hf-torch,plain-jax
  python benchmarks/train_throughput.py --model=resnet50 --image_size=128 --batch_size=8 \
      --compare=hf-torch
  python benchmarks/train_throughput.py --model=moe --tiny    # MoE beside its dense twin

The model family is data (`FAMILIES`, by the preset's arch): text models (--model gpt2 or
llama, the default --preset) count tokens, image models (any resnet* preset, cnn;
benchmarks/image_bench.py) count images, and --model=moe (benchmarks/moe_bench.py) times a
Mixtral-shaped mixture of experts with, as rows beside it, the dense step of equal active FLOPs
and the MoE's capacity dispatch (`--compare=dense,moe-capacity`, its default; add hf-torch for
transformers' Mixtral), --model=rnn / rnn_classify (benchmarks/rnn_bench.py) an LSTM language
model / classifier beside torch's nn.LSTM, and --model=dcgan (benchmarks/gan_bench.py) one DCGAN
step beside a torch DCGAN; all share the timing, the turns, the ceilings and the JSON below.

Defaults are the issue's reference config (GPT-2 shape, 6 layers, d_model 512, 8 heads, seq 256,
batch 8, vocab 8192, AdamW, fp32). The train step is llmjax's own, jitted as the loop jits it
(explicit shardings, donated state) on a 1-device mesh, or on all devices with --mesh data=-1.
Compilation and --warmup steps are excluded; the figure is the median of --steps timed steps,
each ended by block_until_ready. For text, `--compare=hf-torch` times transformers'
GPT2LMHeadModel with torch.optim.AdamW (same shapes, hyper-parameters, schedule, clipping and
decay mask) in the same process (image models: see image_bench.py), and `--compare=plain-jax`
the simplest flax GPT-2 train step a JAX user would write from the flax and optax docs
(benchmarks/plain_jax_gpt.py: same shapes and optimiser, no llmjax code), so that what llmjax's
machinery costs is visible; `--compare=hf-torch,plain-jax` times all three. `--compare=bf16`
times llmjax's own step with bfloat16 compute and float32 parameters (same seed, same batch)
beside the float32 one, and measures a bfloat16 matmul beside the float32 ceiling. The systems take
turns in blocks of --block timed steps, each block after one untimed settling step, so that
shared load hits all alike without charging any for the switch. The JSON and the report name
the host's CPU (model, family/model, ISA flags, a host-kind key: benchmarks/host.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_common as common  # noqa: E402
import gan_bench  # noqa: E402
import image_bench  # noqa: E402
import moe_bench  # noqa: E402
import rnn_bench  # noqa: E402
import torch_peers  # noqa: E402
from llmjax import flops  # noqa: E402
from llmjax.models import presets  # noqa: E402
from llmjax.tasks.lm import LM  # noqa: E402
from llmjax.train import optim  # noqa: E402

FLOP_FORMULA = (
    "train FLOPs/step = 3 x forward; forward per sequence = 2*L*n_layers*(matmul params per "
    "block: q,k,v,o + MLP) + n_layers*4*L^2*N*H*(1/2 causal) + 2*L*D*V (logits); x batch. "
    "Embedding lookups, norms, softmax, elementwise and optimizer work not counted "
    "(llmjax.flops.train_flops_per_step).")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_model_flags(p)
  p.add_argument("--model", default="",
                 choices=("",) + TEXT_MODELS + image_bench.MODELS + tuple(EXTRA_FAMILIES),
                 help="a preset: gpt2 or llama (text; the same as --preset) or an image preset "
                      "(resnet18 ... resnet152, cnn), or moe (Llama-shaped experts), rnn / "
                      "rnn_classify (LSTM LM / classifier), dcgan; empty: --preset")
  image_bench.add_flags(p)
  moe_bench.add_flags(p)
  rnn_bench.add_flags(p)
  gan_bench.add_flags(p)
  p.add_argument("--steps", type=int, default=9, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--block", type=int, default=3,
                 help="with --compare: timed steps of one system before switching to the other, "
                      "after one untimed settling step (1: strict alternation, no settling)")
  p.add_argument("--mesh", default="data=1",
                 help="'data=1' (one device, default) or e.g. 'data=-1' for all devices")
  p.add_argument("--rules", default="dp", choices=("dp", "fsdp", "tp", "fsdp_tp"))
  p.add_argument("--matmul_n", type=int, default=4096,
                 help="size of the square matmul measured as the same-run ceiling")
  p.add_argument("--matmul_repeats", type=int, default=5,
                 help="single-shot matmul measurements before and after the steps; best kept")
  p.add_argument("--compare", default="",
                 help="comma-separated systems timed beside llmjax: hf-torch (transformers + "
                      "torch), plain-jax (benchmarks/plain_jax_gpt.py; text models only), bf16 "
                      "(llmjax's own step with bfloat16 compute and float32 parameters)")
  p.add_argument("--threads", type=int, default=0,
                 help="pin the process to this many cores, torch threads to match (0: all cores); "
                      "1 gives a like-for-like figure when other processes share the cores")
  # a family's own shape defaults (the LSTMs' are not the GPT reference's), before the full parse
  known, _ = p.parse_known_args(argv)
  if known.model in EXTRA_FAMILIES:
    p.set_defaults(**EXTRA_FAMILIES[known.model].defaults)
  args = p.parse_args(argv)
  if args.model in TEXT_MODELS + moe_bench.MODELS:
    args.preset = "llama" if args.model in moe_bench.MODELS else args.model
  args.model = args.model or args.preset
  family = family_of(args)
  common.apply_tiny(args, family.tiny)
  if args.tiny:
    args.matmul_n = min(args.matmul_n, 256)
    args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
  if args.steps < 1 or args.warmup < 0 or args.block < 1:
    p.error("--steps and --block must be >= 1 and --warmup >= 0")
  args.compare = tuple(filter(None, args.compare.split(",")))
  if args.model in moe_bench.MODELS:
    args.compare = args.compare or ("dense", "moe-capacity")
    if moe_bench.check(args):
      p.error(moe_bench.check(args))
  elif set(args.compare) & set(moe_bench.COMPARE):
    p.error("--compare=dense,moe-capacity are the rows beside --model=moe only")
  unknown = set(args.compare) - set(COMPARE)
  if unknown:
    p.error(f"--compare: unknown system {sorted(unknown)[0]!r}; allowed: {', '.join(COMPARE)}")
  if "plain-jax" in args.compare and family.plain_jax_runner is None:
    p.error("--compare=plain-jax has a counterpart for text models only (a flax GPT-2)")
  if "plain-jax" in args.compare and args.mesh not in ("", "data=1"):
    p.error("--compare=plain-jax runs on one device: use --mesh data=1")
  if "bf16" in args.compare and args.dtype != "float32":
    p.error("--compare=bf16 times bfloat16 compute beside float32: use --dtype float32")
  if set(args.compare) - {"bf16"} - set(moe_bench.COMPARE) and family.compare_error(args):
    p.error(family.compare_error(args))
  return args


# --compare systems: flag value -> (key in the JSON, short name in ratio keys, report label).
COMPARE = {"hf-torch": ("hf_torch", "torch", "transformers (torch)"),
           "plain-jax": ("plain_jax", "plain_jax", "plain flax GPT (jax)"),
           "bf16": ("jax_bf16", "bf16", "llmjax, bf16 compute"), **moe_bench.COMPARE}


def jax_runner(b: common.Built):
  """(run one step, info): lower+compile timed apart; then the compiled, donating step."""
  start = time.perf_counter()
  compiled = common.lower(b).compile()
  info = {"compile_s": time.perf_counter() - start, "losses": [],
          "n_params": sum(x.size for x in jax.tree.leaves(b.abstract_state.params))}
  holder = {"state": common.init_state(b)}
  batch = common.random_batch(b)

  def once():
    state, metrics = compiled(holder["state"], batch)
    jax.block_until_ready((state, metrics))
    holder["state"] = state
    info["losses"].append(float(metrics["loss"]))

  return once, info


def bf16_runner(args, family: common.Family, b: common.Built):
  """(run one step, info): llmjax's step for the same flags, on b's devices, with bfloat16
  compute; the parameters (and so the initial state, from the same seed) stay float32."""
  bf16_args = argparse.Namespace(**{**vars(args), "dtype": "bfloat16"})
  exp = family.experiment(bf16_args)
  return jax_runner(common.build(exp, list(b.mesh.devices.flat), family.task(exp, bf16_args)))


def torch_matmul_peak(n: int, repeats: int) -> float:
  import torch
  a = torch.ones(n, n)
  torch.mm(a, a)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, a)
    times.append(time.perf_counter() - start)
  return 2.0 * n**3 / statistics.median(times)


def hf_torch_runner(exp, seed: int = 0, threads: int = 0):
  """(run one step, info): transformers GPT2LMHeadModel + torch AdamW, same shapes and settings."""
  import torch
  import transformers

  threads = torch_peers.set_threads(threads, seed)
  m, o = exp.model, exp.optim
  hf_config = transformers.GPT2Config(
      vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.n_layers,
      n_head=m.n_heads, n_inner=m.d_ff, activation_function="gelu_new",
      layer_norm_epsilon=m.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
      attn_implementation="sdpa")
  model = transformers.GPT2LMHeadModel(hf_config).train()
  # llmjax decays only matrices, never biases, norms or embeddings (optim.NO_DECAY): same here.
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    (decay if param.ndim >= 2 and ".wte." not in f".{name}" and ".wpe." not in f".{name}"
     else no_decay).append(param)
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  # The same warmup + cosine schedule as the jax step (optax values, read once on the host).
  lrs = np.asarray(jax.vmap(optim.learning_rate_schedule(o, exp.train.steps))(
      np.arange(exp.train.steps + 1)))
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda i: float(lrs[min(i, len(lrs) - 1)]) / o.lr)
  shape = (exp.train.batch_size, exp.data.seq_len)
  tokens = torch.from_numpy(np.random.default_rng(seed).integers(0, m.vocab_size, shape))
  info = {"losses": [], "threads": threads,
          "attn_implementation": model.config._attn_implementation,
          "n_params": sum(p.numel() for p in model.parameters())}

  def once():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    opt.step()
    scheduler.step()
    info["losses"].append(float(loss.detach()))  # CPU torch is synchronous: the step is done

  return once, info


def plain_jax_runner(exp, args):
  """(run one step, info): benchmarks/plain_jax_gpt.py at the experiment's shapes and settings."""
  import plain_jax_gpt as plain
  m, o = exp.model, exp.optim
  config = plain.GPTConfig(vocab_size=m.vocab_size, seq_len=exp.data.seq_len, d_model=m.d_model,
                           n_layers=m.n_layers, n_heads=m.n_heads, d_ff=m.d_ff,
                           norm_eps=m.norm_eps, dtype=jax.numpy.dtype(m.dtype))
  opt = plain.OptConfig(lr=o.lr, warmup_steps=o.warmup_steps, total_steps=exp.train.steps,
                        min_lr_ratio=o.min_lr_ratio, b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay, grad_clip=o.grad_clip)
  return plain.runner(config, opt, exp.train.batch_size)


def _text_compare_error(args) -> str:
  if args.preset != "gpt2":
    return (f"--compare={','.join(args.compare)} runs GPT-2 counterparts (transformers' "
            "GPT2LMHeadModel, benchmarks/plain_jax_gpt.py): use --preset gpt2")
  if args.n_kv_heads not in (0, args.n_heads):
    return "--compare: the GPT-2 counterparts have no grouped-query attention: drop --n_kv_heads"
  return ""


def _text_config(exp, args) -> dict:
  return {"model": dataclasses.asdict(exp.model), "optim": dataclasses.asdict(exp.optim),
          "batch": exp.train.batch_size, "seq_len": exp.data.seq_len}


def _text_describe(exp, args) -> str:
  m = exp.model
  return (f"model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, d_ff {m.d_ff}, "
          f"vocab {m.vocab_size}, seq {exp.data.seq_len}, batch {exp.train.batch_size}, "
          f"{m.dtype}, remat {m.remat}, scan {m.scan_layers}")


TEXT_MODELS = ("gpt2", "llama")
TEXT = common.Family(
    unit="tokens", tiny=common.TINY,
    experiment=lambda args: common.experiment(args, mesh=args.mesh, rules=args.rules),
    task=lambda exp, args: LM(exp),  # the main job's objective: what `llmjax train` runs
    units_per_step=lambda exp, args: exp.train.batch_size * exp.data.seq_len,
    flops_per_step=lambda exp, args: flops.train_flops_per_step(
        exp.model, exp.train.batch_size, exp.data.seq_len),
    flop_formula=FLOP_FORMULA, describe=_text_describe, config=_text_config,
    torch_runner=lambda exp, task, args: hf_torch_runner(exp, threads=args.threads),
    compare_error=_text_compare_error, plain_jax_runner=plain_jax_runner)
# A preset's arch picks its family.
FAMILIES = {"transformer": TEXT, "resnet": image_bench.FAMILY, "cnn": image_bench.FAMILY}
# Families named by --model rather than by a preset's arch.
EXTRA_FAMILIES = {"moe": moe_bench.family(TEXT), "rnn": rnn_bench.family(),
                  "rnn_classify": rnn_bench.family(), "dcgan": gan_bench.FAMILY}


def family_of(args) -> common.Family:
  if args.model in EXTRA_FAMILIES:
    return EXTRA_FAMILIES[args.model]
  return FAMILIES[presets.get(args.model).get("arch", "transformer")]


def rates(timing: dict, unit: str, units_per_step: int, flops_per_step: float, ceiling: float,
          datasheet: float | None, cpu_ceiling: float) -> dict:
  """Rates from the median step; *_best from the fastest step (least disturbed by load);
  *_per_cpu_s from process CPU seconds, against the matmul's FLOPs per CPU second. `unit`
  names the counts: tokens_per_s, images_per_s, ..."""
  seconds, best = timing["median_step_s"], min(timing["step_times_s"])
  achieved = flops_per_step / seconds
  per_cpu_s = flops_per_step / timing["median_step_cpu_s"]
  return {f"{unit}_per_s": units_per_step / seconds, "achieved_flops_per_s": achieved,
          "tflops_per_s": achieved / 1e12, "fraction_of_measured_matmul": achieved / ceiling,
          "mfu_datasheet": achieved / datasheet if datasheet else None,
          "best_step_s": best, f"{unit}_per_s_best": units_per_step / best,
          "fraction_of_measured_matmul_best": flops_per_step / best / ceiling,
          f"{unit}_per_cpu_s": units_per_step / timing["median_step_cpu_s"],
          "flops_per_cpu_s": per_cpu_s, "fraction_of_matmul_per_cpu_s": per_cpu_s / cpu_ceiling}


def measure(args, family: common.Family, b: common.Built) -> tuple[dict, dict]:
  """(timings per system, ceilings): matmul shots, the systems' turns, matmul shots again."""
  on_cpu = jax.default_backend() == "cpu"
  # Simulated CPU devices share the same cores: the ceiling is one device's, not n times it.
  scale = 1 if on_cpu else b.mesh.size
  per_device_peak = flops.device_peak(jax.devices()[0].device_kind, args.dtype)
  shots_before = flops.matmul_shots(args.dtype, args.matmul_n, args.matmul_repeats)
  runners, infos = {}, {}
  runners["jax"], infos["jax"] = jax_runner(b)
  if "hf-torch" in args.compare:
    runners["hf_torch"], infos["hf_torch"] = family.torch_runner(b.exp, b.task, args)
  if "plain-jax" in args.compare:
    runners["plain_jax"], infos["plain_jax"] = family.plain_jax_runner(b.exp, args)
  if "bf16" in args.compare:
    runners["jax_bf16"], infos["jax_bf16"] = bf16_runner(args, family, b)
    bf16_before = flops.matmul_shots("bfloat16", args.matmul_n, args.matmul_repeats)
  for key, exp in moe_bench.variants(args).items():  # --model=moe: its dense twin, capacity
    runners[key], infos[key] = jax_runner(common.build(exp, list(b.mesh.devices.flat), LM(exp)))
  # Systems take turns in blocks: under shared, drifting load both see the same conditions.
  timings = common.time_interleaved(runners, args.steps, args.warmup, args.block)
  for name, info in infos.items():
    losses = info.pop("losses")
    timings[name].update(info, final_loss=losses[-1], first_loss=losses[0])
  shots_after = flops.matmul_shots(args.dtype, args.matmul_n, args.matmul_repeats)
  bf16_shots = []
  if "bf16" in args.compare:
    bf16_shots = bf16_before + flops.matmul_shots("bfloat16", args.matmul_n, args.matmul_repeats)
  matmul_before = [shot["flops_per_s"] for shot in shots_before]
  matmul_after = [shot["flops_per_s"] for shot in shots_after]
  ceilings = {
      "datasheet_flops_per_s": per_device_peak * scale if per_device_peak else None,
      # The best single shot before or after: a ceiling, so load during a shot cannot flatter MFU.
      "measured_matmul_flops_per_s": max(matmul_before + matmul_after) * scale,
      "measured_matmul_shots_before": matmul_before,
      "measured_matmul_shots_after": matmul_after,
      "matmul_n": args.matmul_n, "matmul_dtype": args.dtype,
      "measured_matmul_flops_per_cpu_s": max(shot["flops_per_cpu_s"]
                                             for shot in shots_before + shots_after),
      # With --compare=bf16: the same matmul in bfloat16 (does the host have bf16 units?).
      "measured_bf16_matmul_flops_per_s": (max(shot["flops_per_s"] for shot in bf16_shots)
                                           * scale if bf16_shots else None),
      "note": "measured: best single shot of a jitted [n,n]@[n,n] on one device, before and "
              "after the steps; datasheet: llmjax.flops.PEAKS (None on CPUs); every system's "
              "fraction is against the --dtype ceiling, bf16 included"}
  return timings, ceilings


def run(args) -> dict:
  family = family_of(args)
  exp = family.experiment(args)
  devices = jax.devices()[:1] if args.mesh in ("", "data=1") else jax.devices()
  b = common.build(exp, devices, family.task(exp, args))
  timings, c = measure(args, family, b)
  unit = family.unit
  units_per_step = family.units_per_step(exp, args)
  flops_per_step = family.flops_per_step(exp, args)
  ceiling, cpu_ceiling = c["measured_matmul_flops_per_s"], c["measured_matmul_flops_per_cpu_s"]
  common_env = common.environment()
  result = {
      "benchmark": "train_throughput",
      "environment": common_env,
      "unit": unit,
      "description": family.describe(exp, args),
      "rates_note": f"{unit}/s, TFLOP/s, fractions: median step; *_best: fastest step; "
                    "*_per_cpu_s: median process CPU seconds (user+system, all threads) per "
                    "step, against the matmul's FLOPs per CPU second; fraction_of_measured_matmul "
                    "is the MFU against the same-run matmul ceiling",
      "config": {**family.config(exp, args), "model_name": args.model,
                 "mesh": dict(b.mesh.shape), "rules": args.rules,
                 "steps": args.steps, "warmup": args.warmup, "block": args.block,
                 "tiny": args.tiny, "threads": args.threads or "default",
                 "cpu_affinity": sorted(os.sched_getaffinity(0))},
      "flop_formula": family.flop_formula,
      "flops_per_step": flops_per_step,
      f"{unit}_per_step": units_per_step,
      "ceilings": c,
      "host_kind": common_env["host"]["kind"],
      "timing": "median of --steps per system after compilation and --warmup steps; with "
                "--compare the systems take turns, --block timed steps each after one "
                "untimed settling step",
      "jax": {**timings["jax"], **rates(timings["jax"], unit, units_per_step, flops_per_step,
                                        ceiling, c["datasheet_flops_per_s"], cpu_ceiling)},
  }
  if "hf_torch" in timings:
    torch_mm = torch_matmul_peak(args.matmul_n, args.matmul_repeats) if args.dtype == "float32" \
        else None
    result["hf_torch"] = {**timings["hf_torch"],
                          **rates(timings["hf_torch"], unit, units_per_step, flops_per_step,
                                  ceiling, None, cpu_ceiling),
                          "torch_matmul_flops_per_s": torch_mm}
  # JAX systems: rates as llmjax's (at llmjax's FLOPs: the MoE rows' active FLOPs are equal),
  # datasheet MFU included
  for key in ("plain_jax", "jax_bf16") + tuple(k for k, _, _ in moe_bench.COMPARE.values()):
    if key in timings:
      result[key] = {**timings[key], **rates(timings[key], unit, units_per_step, flops_per_step,
                                              ceiling, c["datasheet_flops_per_s"], cpu_ceiling)}
  for key, short, _ in COMPARE.values():
    if key in result:
      for suffix in ("per_s", "per_s_best", "per_cpu_s"):
        result[f"jax_over_{short}_{unit}_{suffix}"] = (result["jax"][f"{unit}_{suffix}"] /
                                                       result[key][f"{unit}_{suffix}"])
  return result


def report(result: dict) -> str:
  unit = result["unit"]
  header = ["system", f"{unit}/s", "median step s", "best step s", "TFLOP/s", "% matmul ceiling",
            "MFU datasheet", "CPU s/step", "% matmul FLOP/CPU-s"]
  rows = []
  for key, label in [("jax", "llmjax (jax)")] + [(k, label) for k, _, label in COMPARE.values()]:
    if key in result:
      r = result[key]
      rows.append([r.get("peer", label), r[f"{unit}_per_s"], r["median_step_s"], r["best_step_s"],
                   r["tflops_per_s"],
                   100 * r["fraction_of_measured_matmul"],
                   None if r["mfu_datasheet"] is None else 100 * r["mfu_datasheet"],
                   r["median_step_cpu_s"], 100 * r["fraction_of_matmul_per_cpu_s"]])
  c, env = result["ceilings"], result["environment"]
  lines = [
      f"train_throughput  {env['date']}  {env['backend']} ({env['device_kind']}), "
      f"{env['cpu_count']} CPUs, load {env['load_average_1_5_15']}",
      common.host_line(env),
      result["description"],
      f"FLOPs/step {result['flops_per_step']:.4g}  ({result['flop_formula']})",
      f"ceilings: measured {c['matmul_dtype']} matmul n={c['matmul_n']}: "
      f"{c['measured_matmul_flops_per_s'] / 1e9:.4g} GFLOP/s (best shot), "
      f"{c['measured_matmul_flops_per_cpu_s'] / 1e9:.4g} GFLOP per CPU-second; datasheet: "
      + ("n/a" if c["datasheet_flops_per_s"] is None
         else f"{c['datasheet_flops_per_s'] / 1e12:.4g} TFLOP/s")
      + ("" if c.get("measured_bf16_matmul_flops_per_s") is None else
         f"; bfloat16 matmul: {c['measured_bf16_matmul_flops_per_s'] / 1e9:.4g} GFLOP/s"),
      f"jax compile {result['jax']['compile_s']:.3g} s"
      + (f", plain-jax compile {result['plain_jax']['compile_s']:.3g} s"
         if "plain_jax" in result else ""),
      "",
      common.format_table(header, rows),
      "losses (first -> last step on one batch): " + ", ".join(
          f"{label} {result[key]['first_loss']:.4f} -> {result[key]['final_loss']:.4f}"
          for key, label in [("jax", "llmjax")] + [(k, s) for k, s, _ in COMPARE.values()]
          if key in result),
  ]
  for _, short, _ in COMPARE.values():
    ratio = f"jax_over_{short}_{unit}_per_s"
    if ratio in result:
      lines.append(f"\njax/{short} {unit}/s ratio: {result[ratio]:.3f} (median steps), "
                   f"{result[ratio + '_best']:.3f} (best steps), "
                   f"{result[f'jax_over_{short}_{unit}_per_cpu_s']:.3f} (per CPU second)")
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.threads:
    common.limit_threads(args.threads)
  result = run(args)
  for value in (result["jax"][f"{result['unit']}_per_s"], result["jax"]["achieved_flops_per_s"]):
    assert math.isfinite(value) and value > 0, value
  print(report(result))
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
