"""Distilling the fine-tuned stdlib-package classifier into a smaller encoder.

  llmjax train --config=experiments/text/stdlib_bert_mlm.py --workdir=runs/stdlib_bert_mlm
  llmjax train --config=experiments/text/stdlib_classify.py --workdir=runs/stdlib_classify \
      --config.train.init_from=workdir:runs/stdlib_bert_mlm                    # the teacher
  llmjax train --config=experiments/distill/stdlib_classify_student.py --workdir=runs/cls_kd
  llmjax train --config=experiments/distill/stdlib_classify_student.py:scratch \
      --workdir=runs/cls_student
  llmjax train --config=experiments/distill/stdlib_classify_student.py:smoke --workdir=/tmp/cls

The teacher is experiments/text/stdlib_classify.py's BERT-style encoder (4 blocks of width 256),
MLM-pretrained and fine-tuned; the student has 2 blocks of width 128 (about a sixth of the
encoder's parameters besides the shared-size vocabulary), starts from random weights and reads
the teacher's WordPiece vocabulary (config.data.tokenizer=hf:runs/stdlib_bert_mlm). Both
students see the same data in the same order for the teacher's step count; distilled, half the
loss is T^2 KL to the teacher's class distribution at T = 2 (big_vision's and Hinton's recipe:
only the student differentiated, the teacher in eval mode on the same batch).
`:smoke` needs no earlier run: its teacher is experiments/text/stdlib_classify.py's `:smoke` from
random init, trained first in WORKDIR/teacher (`experiment:` teachers), whose trained vocabulary
the student then reads.
"""

import pathlib

from llmjax import config as config_lib

TEACHER = "workdir:runs/stdlib_classify"
SMOKE_TEACHER = (f"experiment:{pathlib.Path(__file__).resolve().parents[1]}"
                 "/text/stdlib_classify.py:scratch,smoke")


def get_config(arg=None):
  args = set((arg or "").split(",")) - {""}
  c = config_lib.experiment_module("../text/stdlib_classify.py", __file__).get_config("scratch")
  c.unlock()
  c.name = "stdlib_classify_student"
  c.model.d_model, c.model.n_layers, c.model.d_ff = 128, 2, 512
  c.data.tokenizer = "hf:runs/stdlib_bert_mlm"
  if "smoke" in args:  # the teacher's own spec: config_lib.smoke shrinks both to wordpiece:512
    c.data.tokenizer = "wordpiece:4096"
  if "scratch" not in args:
    c.distill.teacher = SMOKE_TEACHER if "smoke" in args else TEACHER
    c.distill.alpha = 0.5
    c.distill.temperature = 2.0
  return config_lib.finalize(c, ",".join(sorted(args - {"scratch"})) or None)
