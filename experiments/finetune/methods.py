"""The fine-tuning methods side by side: one setting per method, shared by the comparisons.

Not an experiment itself: experiments/finetune/*.py take `METHOD` (and `smoke`) as their
argument (`lora` when none is named, so `:smoke` alone is `:lora,smoke`) and apply the method's
settings on top of their task. Learning rates are the usual ones
for each method's kind of parameters (a new full set of weights wants the smallest, a prompt the
largest); nothing here was tuned on the comparison's test data.
"""

METHODS = ("full", "freeze", "bitfit", "lora", "adalora", "adapter", "prompt", "prefix")
DEFAULT = "lora"  # the method of an argument that names none

# method -> (config.finetune fields, learning rate)
SETTINGS = {
    "full": ({}, 3e-4),
    "freeze": ({"presets": "top_k_layers=1"}, 1e-3),
    "bitfit": ({}, 3e-3),
    "lora": ({"lora_rank": 8, "lora_alpha": 16.0, "lora_targets": "all_linear"}, 2e-3),
    "adalora": ({"lora_rank": 12, "adalora_target_rank": 8, "lora_alpha": 16.0,
                 "lora_targets": "all_linear", "adalora_interval": 10}, 2e-3),
    "adapter": ({"adapter_dim": 16}, 1e-3),
    "prompt": ({"prompt_length": 16}, 3e-2),
    "prefix": ({"prefix_length": 16}, 1e-2),
}


def split_arg(arg, allowed=METHODS):
  """'lora,smoke' -> ('lora', 'smoke' or None); 'smoke' or none -> DEFAULT's."""
  args = [a for a in (arg or "").split(",") if a]
  methods = [a for a in args if a in allowed] or [DEFAULT]
  if len(methods) != 1:
    from llmjax.errors import ConfigError
    raise ConfigError(f"config argument {arg!r}: name at most one method of "
                      f"{', '.join(allowed)} (optionally ',smoke')")
  rest = [a for a in args if a not in allowed]
  return methods[0], ",".join(rest) or None


def apply(c, method: str, lr_scale: float = 1.0):
  """Set config.finetune and the learning rate for `method` on ConfigDict `c`."""
  fields, lr = SETTINGS[method]
  c.finetune.method = method
  for key, value in fields.items():
    c.finetune[key] = value
  c.optim.lr = lr * lr_scale
  return c


def finalize(c, rest):
  """config_lib.finalize, and for `smoke` a run that needs no base: from random init, rows 16
  tokens short of the shrunk model's positions (room for a prompt or prefix)."""
  from llmjax import config as config_lib
  if rest == "smoke":
    c = config_lib.smoke(c)
    c.train.init_from, c.train.init_new = "", ""
    c.data.seq_len = c.model.max_len - 16
    rest = None
  return config_lib.finalize(c, rest)
