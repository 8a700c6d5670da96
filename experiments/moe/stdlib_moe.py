"""Byte-level mixture-of-experts decoder on the Python standard library's own source, beside the
dense decoder of equal active parameters, experiments/lm/stdlib_gpt.py (its data, sequence
length, batch, steps and schedule).

  llmjax train --config=experiments/moe/stdlib_moe.py --workdir=runs/stdlib_moe
  llmjax train --config=experiments/lm/stdlib_gpt.py --workdir=runs/stdlib_gpt
  llmjax train --config=experiments/moe/stdlib_moe.py:smoke --workdir=/tmp/moe_smoke

stdlib_gpt's 4 Llama blocks of width 256 with each SwiGLU MLP (width 704) replaced by 8 SwiGLU
experts of width 352, 2 per token: a token multiplies the same MLP weights as in stdlib_gpt
(2 x 352 = 704) plus the 256 x 8 router, while the model holds 4x the MLP parameters. Dropless
routing (grouped matmuls), Switch load-balancing loss weight 0.01, z-loss 1e-3. Measured side
by side in docs/moe.md.
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.experiment_module("../lm/stdlib_gpt.py", __file__).get_config()
  c.unlock()
  c.name = "stdlib_moe"
  c.model.update(dict(n_experts=8, experts_per_token=2, moe_d_ff=352, moe_aux_loss_weight=0.01,
                      moe_z_loss_weight=1e-3))
  return config_lib.finalize(c, arg)
