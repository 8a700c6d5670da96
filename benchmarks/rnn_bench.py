"""The recurrent families of train_throughput.py: the LSTM language model (--model=rnn) and the
LSTM classifier (--model=rnn_classify), beside torch's nn.LSTM of the same shapes.

  python benchmarks/train_throughput.py --model=rnn --compare=hf-torch --threads=1
  python benchmarks/train_throughput.py --model=rnn_classify --compare=hf-torch
  python benchmarks/train_throughput.py --model=rnn --tiny --compare=hf-torch    # seconds

llmjax's side is its own train step on the `rnn` preset (models/rnn.py: an embedding, --rnn_layers
flax LSTM layers of --rnn_hidden units, a dense head) with the task `lm` (every next token) or
`classify` (a bidirectional stack, outputs averaged over the row, --text_classes labels).
`--compare=hf-torch` trains the model a torch user writes: nn.Embedding, nn.LSTM (batch_first,
bidirectional for the classifier) and nn.Linear, with torch's AdamW set as llmjax's optimiser
(benchmarks/torch_peers.py), starting from llmjax's initial weights converted to torch's layout
(the inverse of models/rnn_torch.py; torch's second bias `bias_hh` starts at zero), on the same
batch: both first losses are the same number up to float32 rounding, which the JSON and the
report show. Defaults: a byte-level model (vocab 256, the main job's tokenizer) of 2 layers of
256 units, sequences of 128, batch 32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import bench_common as common
import torch_peers
from llmjax import config as configlib
from llmjax import flops
from llmjax.models import rnn_torch
from llmjax.tasks.classify import Classify
from llmjax.tasks.lm import LM

MODELS = ("rnn", "rnn_classify")
DEFAULTS = dict(d_model=256, seq_len=128, batch=32, vocab=256)
TINY = dict(d_model=16, rnn_hidden=16, rnn_layers=1, seq_len=16, batch=2, vocab=64,
            text_classes=4)
FLOP_FORMULA = (
    "train FLOPs/step = 3 x forward x batch; forward per sequence = per layer and direction "
    "2*L*4*(in + H)*H (the LSTM's four gates) + the head: 2*L*H*V (lm) or 2*E*C (classify). "
    "Embedding lookups, gate nonlinearities, pooling and optimizer work not counted "
    "(llmjax.flops.lm_forward / classify_forward).")


def add_flags(parser) -> None:
  parser.add_argument("--rnn_hidden", type=int, default=256, help="--model=rnn*: LSTM units")
  parser.add_argument("--rnn_layers", type=int, default=2, help="--model=rnn*: LSTM layers")
  parser.add_argument("--text_classes", type=int, default=4,
                      help="--model=rnn_classify: labels")


def _classify(args) -> bool:
  return args.model == "rnn_classify"


def experiment(args) -> configlib.Experiment:
  both = _classify(args)
  c = configlib.base_config()
  c.name = f"throughput_{args.model}"
  c.model = configlib.model_section(
      "rnn", vocab_size=args.vocab, d_model=args.d_model, rnn_hidden=args.rnn_hidden,
      rnn_layers=args.rnn_layers, max_len=args.seq_len, dtype=args.dtype, bidirectional=both)
  if both:
    c.task.name, c.task.num_classes = "classify", args.text_classes
  c.data.seq_len = args.seq_len
  c.train.batch_size = args.batch
  c.mesh.update(common.parse_mesh(args.mesh))
  c.mesh.rules = args.rules
  return configlib.resolve(c)


def task(exp, args):
  return Classify(exp, {"num_classes": args.text_classes}) if _classify(args) else LM(exp)


def _forward(exp, args):
  m, length = exp.model, exp.data.seq_len
  if _classify(args):
    return flops.classify_forward(m, length, args.text_classes, pooled=False)
  return flops.lm_forward(m, length)


def describe(exp, args) -> str:
  m = exp.model
  kind = (f"classifier ({args.text_classes} labels, mean pooling, both directions)"
          if _classify(args) else "language model")
  return (f"model: LSTM {kind}, {m.rnn_layers} layers of {m.rnn_hidden} units, embedding "
          f"{m.d_model}, vocab {m.vocab_size}, seq {exp.data.seq_len}, batch "
          f"{exp.train.batch_size}, {m.dtype}")


def config(exp, args) -> dict:
  return {"model": dataclasses.asdict(exp.model), "optim": dataclasses.asdict(exp.optim),
          "batch": exp.train.batch_size, "seq_len": exp.data.seq_len,
          "text_classes": args.text_classes if _classify(args) else None}


def torch_state(params: dict, cfg) -> dict:
  """llmjax's `rnn/` parameters -> nn.LSTM's state dict (models/rnn_torch.py, inverted)."""
  out = {}
  for k in range(cfg.rnn_layers):
    layer = params[f"layer_{k}"]
    directions = ({"forward_rnn": "", "backward_rnn": "_reverse"} if cfg.bidirectional
                  else {None: ""})
    for name, suffix in directions.items():
      cell = (layer[name] if name else layer)["cell"]
      gates = rnn_torch.GATES["lstm"]
      out[f"weight_ih_l{k}{suffix}"] = np.concatenate([cell[f"i{g}"]["kernel"].T for g in gates])
      out[f"weight_hh_l{k}{suffix}"] = np.concatenate([cell[f"h{g}"]["kernel"].T for g in gates])
      out[f"bias_ih_l{k}{suffix}"] = np.concatenate([cell[f"h{g}"]["bias"] for g in gates])
      out[f"bias_hh_l{k}{suffix}"] = np.zeros_like(out[f"bias_ih_l{k}{suffix}"])
  return out


def torch_runner(exp, task, args, seed: int = 0):
  """(run one step, info): Embedding + nn.LSTM + Linear in torch, llmjax's initial weights."""
  import torch
  threads = torch_peers.set_threads(args.threads, seed)
  m, both = exp.model, _classify(args)
  params = torch_peers.initial_params(task, seed)
  head = "classifier" if both else "lm_head"
  out_width = args.text_classes if both else m.vocab_size
  model = torch.nn.ModuleDict({
      "embed": torch.nn.Embedding(m.vocab_size, m.d_model),
      "lstm": torch.nn.LSTM(m.d_model, m.rnn_hidden, num_layers=m.rnn_layers, batch_first=True,
                            bidirectional=m.bidirectional, dropout=m.dropout),
      "head": torch.nn.Linear(m.rnn_hidden * (2 if m.bidirectional else 1), out_width)})
  state = {"embed.weight": params["embed"]["embedding"],
           "head.weight": params[head]["kernel"].T, "head.bias": params[head]["bias"],
           **{f"lstm.{k}": v for k, v in torch_state(params["rnn"], m).items()}}
  model.load_state_dict({k: torch_peers.tensor(v) for k, v in state.items()})
  model.train()
  batch = common.host_batch(task, exp.train.batch_size, seed)  # the jax step's batch
  tokens_BL = torch.from_numpy(batch["tokens"].astype(np.int64))
  labels_B = torch.from_numpy(batch["labels"].astype(np.int64)) if both else None
  cross_entropy = torch.nn.functional.cross_entropy

  def loss_fn():
    y_BLE, _ = model["lstm"](model["embed"](tokens_BL))
    if both:  # every position is real: the mean over the row
      return cross_entropy(model["head"](y_BLE.mean(dim=1)), labels_B)
    logits_BLV = model["head"](y_BLE)[:, :-1]  # every position's logits, as llmjax's
    return cross_entropy(logits_BLV.reshape(-1, out_width), tokens_BL[:, 1:].reshape(-1))

  opt, scheduler, clip = torch_peers.adamw(
      model.named_parameters(), exp.optim, exp.train.steps,
      lambda name, p: p.ndim >= 2 and not name.startswith("embed."))
  info = {"losses": [], "threads": threads, "peer": "torch nn.LSTM",
          "n_params": sum(p.numel() for p in model.parameters())}
  return torch_peers.train_step(loss_fn, opt, scheduler, clip, info), info


def family() -> common.Family:
  """The LSTM families (LM and classifier: --model picks), torch's nn.LSTM as the peer."""
  return common.Family(
      unit="tokens", tiny=TINY, defaults=DEFAULTS, experiment=experiment, task=task,
      units_per_step=lambda exp, args: exp.train.batch_size * exp.data.seq_len,
      flops_per_step=lambda exp, args: 3.0 * exp.train.batch_size * _forward(exp, args).total,
      flop_formula=FLOP_FORMULA, describe=describe, config=config, torch_runner=torch_runner,
      compare_error=lambda args: "")
