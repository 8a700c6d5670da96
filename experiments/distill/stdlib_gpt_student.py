"""Distilling the main job's byte-level GPT into a student of half its width (or half its depth).

  llmjax train --config=experiments/lm/stdlib_gpt.py --workdir=runs/stdlib_gpt      # the teacher
  llmjax train --config=experiments/distill/stdlib_gpt_student.py --workdir=runs/student_kd
  llmjax train --config=experiments/distill/stdlib_gpt_student.py:scratch --workdir=runs/student
  llmjax train --config=experiments/distill/stdlib_gpt_student.py:layers --workdir=runs/student_kd_l
  llmjax train --config=experiments/distill/stdlib_gpt_student.py:smoke --workdir=/tmp/student

The student is experiments/lm/stdlib_gpt.py's Llama-shaped decoder at d_model 128 (d_ff 352,
4 heads of 32) and 4 blocks, about a quarter of the teacher's parameters; `layers` keeps
the width and halves the depth instead. Everything else is the main job's: the data, its order,
the steps, the optimiser. Distilled: alpha = 0.5 of T^2 KL(teacher_T || student_T) at T = 2 plus
half the next-byte cross-entropy; `:scratch` is the same student on the cross-entropy alone.
The validation loss both report is the plain next-byte loss (nats/byte), so they compare
directly (docs/distill.md has the table). The teacher runs in each step, in eval mode; set
config.distill.top_k to store its top-k logits once instead. `:smoke` needs no earlier run: its
teacher is the main job's `:smoke`, trained first in WORKDIR/teacher (`experiment:` teachers).
"""

import pathlib

from llmjax import config as config_lib

TEACHER = "workdir:runs/stdlib_gpt"
SMOKE_TEACHER = f"experiment:{pathlib.Path(__file__).resolve().parents[1]}/lm/stdlib_gpt.py:smoke"


def get_config(arg=None):
  args = set((arg or "").split(",")) - {""}
  c = config_lib.experiment_module("../lm/stdlib_gpt.py", __file__).get_config(None)
  c.unlock()
  c.name = "stdlib_gpt_student"
  if "layers" in args:
    c.model.n_layers = 2
  else:
    c.model.d_model, c.model.d_ff = 128, 352
  if "scratch" not in args:
    c.distill.teacher = SMOKE_TEACHER if "smoke" in args else TEACHER
    c.distill.alpha = 0.5
    c.distill.temperature = 2.0
  c.train.sample_prompts = 2
  return config_lib.finalize(c, ",".join(sorted(args - {"scratch", "layers"})) or None)
