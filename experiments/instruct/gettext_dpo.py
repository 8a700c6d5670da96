"""Preference tuning (DPO) of the SFT run (experiments/instruct/stdlib_sft.py) on gettext pairs:
the human translation chosen, the translation of the nearest different English message rejected.

  python -m llmjax.data.preference_pairs --source=gettext --out=runs/preference_gettext
  llmjax train --config=experiments/instruct/gettext_dpo.py --workdir=runs/gettext_dpo
  llmjax train --config=experiments/instruct/gettext_dpo.py:before --workdir=runs/gettext_dpo_0
  llmjax train --config=experiments/instruct/gettext_dpo.py:orpo --workdir=runs/gettext_orpo
  llmjax train --config=experiments/instruct/gettext_dpo.py:smoke --workdir=/tmp/smoke

The reference is a frozen copy of the SFT model (config.task.reference='copy'); beta 0.1, the
sigmoid (DPO) loss. The prompts are rendered with the byte chat template the SFT run trained on;
the held-out pairs are val.jsonl, whose English messages the SFT run held out as well (the same
stable hash splits). Each evaluation reports the preference accuracy (how often the model gives
the human translation the higher log-probability), TRL's reward metrics and the greedy chrF of 32
held-out prompts against the human translation. `:before` is the SFT model measured the same
way: one step at learning rate 0. `:orpo` is the one-stage alternative (config.task.name='orpo',
llmjax/tasks/orpo.py): from the main job's base model (no SFT run, no reference), the NLL of the
chosen translation (its completion tokens, as the SFT run trains) plus 0.1 x the odds-ratio term,
at the SFT run's learning rate and length. `:smoke` is a tiny randomly initialised model on the
first pairs of the same files (no SFT run needed).
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.experiment_module("stdlib_sft.py", __file__).get_config(None)
  c.unlock()
  c.name = "gettext_dpo"
  c.task.name = "dpo"
  c.task.beta = 0.1
  c.task.loss_type = "sigmoid"
  c.task.reference = "copy"
  c.task.completions = 32
  c.task.max_new_tokens = 64
  c.data.files = "runs/preference_gettext/train.jsonl"
  c.data.val_files = "runs/preference_gettext/val.jsonl"
  c.data.chat_template = "byte"
  c.train.init_from = "workdir:runs/stdlib_sft"
  c.train.batch_size = 16  # pairs: 32 sequences per step, and the reference's forward besides
  c.train.steps = 150
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 8
  c.train.checkpoint_every = 50
  c.optim.lr = 5e-5
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  if arg == "before":
    c.train.steps = 1
    c.train.eval_every = 1
    c.optim.lr = 0.0
    c.optim.warmup_steps = 0
    arg = None
  if arg == "orpo":
    c.name = "gettext_orpo"
    c.task.name = "orpo"
    c.task.nll_tokens = "completion"
    c.train.init_from = "workdir:runs/stdlib_gpt"
    c.train.steps = 300
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 20
    arg = None
  if arg == "smoke":
    c.train.init_from = ""  # the smoke model is smaller than the SFT run
    c.task.completions = 4
    c.task.max_new_tokens = 16
    c.data.max_bytes = 20_000
  return config_lib.finalize(c, arg)
