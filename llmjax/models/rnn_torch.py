"""torch `nn.LSTM` / `nn.GRU` / `nn.RNN` (tanh) weights -> the parameters of llmjax's recurrent
stack (`models/rnn.py`, the `rnn/` subtree of `RNNLM` and `RNNClassifier`). numpy only: torch is
never imported; pass a state dict of numpy arrays (or of CPU tensors, read through `.numpy()`).

torch keeps, per layer k and direction ("_reverse" for the backward one), `weight_ih_l{k}`
[G*H, in], `weight_hh_l{k}` [G*H, H] and two biases `bias_ih_l{k}`, `bias_hh_l{k}` [G*H], the G
gates stacked in the order i, f, g, o (LSTM) or r, z, n (GRU). flax's cells keep one kernel per
gate, [in, H] (transposed), and one bias where the gate's two products are summed:
- LSTM: `i{gate}/kernel`, `h{gate}/kernel` and `h{gate}/bias` = bias_ih + bias_hh;
- GRU: r and z as the LSTM's gates but with the bias on the input side (`ir/bias`, `iz/bias`);
  n keeps both, `in/bias` = bias_ih_n and `hn/bias` = bias_hh_n, because torch (and flax)
  multiply the hidden side by r before adding: n = tanh(W_in x + b_in + r * (W_hn h + b_hn));
- simple: `i/kernel`, `i/bias` = bias_ih + bias_hh, `h/kernel`.
`batch_first` changes no weight. torch's `bias=False` reads as zero biases.
"""

from __future__ import annotations

import numpy as np

from llmjax.config import ModelConfig
from llmjax.errors import UserError, capped

GATES = {"lstm": "ifgo", "gru": "rzn", "simple": "_"}


def _array(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, read without importing torch
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def stack_params(state_dict: dict, cfg: ModelConfig, prefix: str = "") -> dict:
  """The `rnn/` parameter subtree equal to the torch module whose weights are
  `state_dict[prefix + "weight_ih_l0"]`, ...; UserError naming a missing, extra or misshapen key."""
  used = set()

  def get(name: str, shape: tuple[int, ...], optional: bool = False) -> np.ndarray:
    key = prefix + name
    if key not in state_dict:
      if optional:
        return np.zeros(shape, np.float32)
      raise UserError(f"torch state dict has no {key!r} (config.model: rnn_cell="
                      f"{cfg.rnn_cell!r}, rnn_layers={cfg.rnn_layers}, bidirectional="
                      f"{cfg.bidirectional}); its keys: {capped(sorted(state_dict), 8)}")
    value = _array(state_dict[key])
    if value.shape != shape:
      raise UserError(f"torch {key!r} has shape {list(value.shape)}, config.model expects "
                      f"{list(shape)} (d_model={cfg.d_model}, rnn_hidden={cfg.rnn_hidden}, "
                      f"rnn_cell={cfg.rnn_cell!r})")
    used.add(key)
    return value

  width, out = cfg.d_model, {}
  for k in range(cfg.rnn_layers):
    directions = {"forward_rnn": "", "backward_rnn": "_reverse"} if cfg.bidirectional else {
        "": ""}
    layer = {}
    for name, suffix in directions.items():
      cell = {"cell": _cell(get, cfg, f"l{k}{suffix}", width)}
      layer.update({name: cell} if name else cell)
    out[f"layer_{k}"] = layer
    width = cfg.rnn_hidden * len(directions)
  extra = sorted(k for k in state_dict if k.startswith(prefix) and k not in used)
  if extra:
    raise UserError(f"torch state dict keys {capped(extra, 4)} have no place in config.model "
                    f"(rnn_layers={cfg.rnn_layers}, bidirectional={cfg.bidirectional})")
  return out


def _cell(get, cfg: ModelConfig, tag: str, width: int) -> dict:
  """One direction of one layer in flax's cell layout (module docstring)."""
  gates, hidden = GATES[cfg.rnn_cell], cfg.rnn_hidden
  rows = len(gates) * hidden
  w_ih = np.split(get(f"weight_ih_{tag}", (rows, width)), len(gates))
  w_hh = np.split(get(f"weight_hh_{tag}", (rows, hidden)), len(gates))
  b_ih = np.split(get(f"bias_ih_{tag}", (rows,), optional=True), len(gates))
  b_hh = np.split(get(f"bias_hh_{tag}", (rows,), optional=True), len(gates))
  if cfg.rnn_cell == "simple":
    return {"i": {"kernel": w_ih[0].T, "bias": b_ih[0] + b_hh[0]}, "h": {"kernel": w_hh[0].T}}
  out = {}
  for g, gate in enumerate(gates):
    if cfg.rnn_cell == "lstm":
      out[f"i{gate}"] = {"kernel": w_ih[g].T}
      out[f"h{gate}"] = {"kernel": w_hh[g].T, "bias": b_ih[g] + b_hh[g]}
    elif gate == "n":
      out["in"] = {"kernel": w_ih[g].T, "bias": b_ih[g]}
      out["hn"] = {"kernel": w_hh[g].T, "bias": b_hh[g]}
    else:
      out[f"i{gate}"] = {"kernel": w_ih[g].T, "bias": b_ih[g] + b_hh[g]}
      out[f"h{gate}"] = {"kernel": w_hh[g].T}
  return out
