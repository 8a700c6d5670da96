"""Knowledge distillation of any task: the student's loss becomes

  alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * the task's own loss,

both summed over exactly the positions the task's loss counts (`Task.predict`'s mask), so
padding, unchosen masked-LM positions and padded classifier rows never count, and both reduce
across devices, microbatches and evaluation batches by adding, like every task loss.

The teacher is the same task bound to the teacher's model (llmjax/train/teacher.py). It runs in
eval mode on the inputs the student sees: the same batch (so the same augmented images) and the
same key for the task's own randomness (so the same masked-LM corruption). Its variables arrive
in the loss as the `TEACHER` collection, outside the parameters the step differentiates, and
its logits pass through `stop_gradient`. An offline teacher (config.distill.top_k) arrives
instead as two columns of the batch, its top-k logits per position, read with the data.

Reports are the task's own, from the task loss alone (comparable with a run that does not
distil), plus `distill_kl` (T^2 KL per counted position) and `combined_loss`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.objectives import distill as objective
from llmjax.objectives.distill import TEACHER
from llmjax.parallel import axes
from llmjax.tasks.base import (CountsFlops, DecodedReport, LossTerms, Predicts, Task, WritesFiles,
                               supports)

# The batch columns of an offline teacher: its top-k logits and their ids at every position.
TOPK_VALUES, TOPK_IDS = "teacher_topk_values", "teacher_topk_ids"
# Hidden-state matching (config.distill.hidden_weight): the projection's place in the params
# tree, beside the student's own, and the info key recording its shape [student D, teacher D].
PROJECTION = "distill_projection"
PROJECTION_SHAPE = "distill_projection_shape"


def without_projection(params: dict) -> dict:
  """The student's own parameters: what eval, export and generation see."""
  return {k: v for k, v in params.items() if k != PROJECTION}


def as_trained(task: Task) -> Task:
  """The task whose init gives a run's checkpointed tree: with the hidden-state projection when
  the run trained one (recorded in its info), else `task` itself."""
  return Distilled(task, None) if PROJECTION_SHAPE in task.info else task


def schedule_value(start: float, end: float, kind: str, step, steps: int):
  """`start` throughout (constant), or moving linearly to `end` at the last step (linear)."""
  if kind == "constant":
    return start
  fraction = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps - 1, 1), 0.0, 1.0)
  return start + (end - start) * fraction


class Distilled(DecodedReport, WritesFiles, CountsFlops, Task):
  """`student` trained against `teacher_task`'s model; every other method is the student's. Its
  capabilities are the student's decoded reports, files and FLOP count, where it has them."""

  def __init__(self, student: Task, teacher_task: Task | None, teacher_model=None):
    super().__init__(student.exp, student.info)
    self.student, self.teacher_task, self.teacher_model = student, teacher_task, teacher_model
    self.name = student.name

  @property
  def capabilities(self):
    return self.student.capabilities & {DecodedReport, WritesFiles, CountsFlops}

  def with_info(self, info):
    teacher = self.teacher_task.with_info(info) if self.teacher_task is not None else None
    return Distilled(self.student.with_info(info), teacher, self.teacher_model)

  # --- the student's own behaviour
  def data(self, workdir):
    return self.student.data(workdir)

  def model(self):
    return self.student.model()

  def peft(self):
    return self.student.peft()

  def example_batch(self, batch_size):
    return self.student.example_batch(batch_size)

  def init(self, model, rngs, batch):
    """The student's variables, plus the hidden-state projection when config asks for one."""
    variables = dict(self.student.init(model, rngs, batch))
    shape = self.info.get(PROJECTION_SHAPE)
    if shape:
      d_student, d_teacher = shape
      kernel = jax.random.normal(jax.random.fold_in(rngs["params"], 17), (d_student, d_teacher))
      params = dict(variables["params"])
      params[PROJECTION] = {"kernel": nn.LogicallyPartitioned(kernel / d_student**0.5,
                                                             (axes.EMBED, None))}
      variables["params"] = params
    return variables

  def decoded_report(self, model, get_params, data, split, limit=None):
    return self.student.decoded_report(model, get_params, data, split, limit)

  def decoded_keys(self):
    return self.student.decoded_keys()

  def write_decoded(self, workdir, step):
    return self.student.write_decoded(workdir, step)

  def headline(self, report):
    return self.student.headline(report) + f" (distilled: KL {report['distill_kl']:.4f})"

  def write_report(self, workdir, report, sums, tag):
    return self.student.write_report(workdir, report, sums, tag)

  def finish(self, outputs):
    return self.student.finish(outputs)

  def tokens_per_example(self):
    return self.student.tokens_per_example()

  def forward_flops_per_example(self):
    """The student's forward, plus the teacher's forward (no backward) when the teacher runs in
    the step and counts its FLOPs."""
    student = self.student.forward_flops_per_example()
    teacher = self.teacher_task
    if teacher is None or self.exp.distill.top_k or not supports(teacher, CountsFlops):
      return student
    return dataclasses.replace(student, no_grad=student.no_grad
                               + teacher.forward_flops_per_example().total)

  # --- what distillation changes
  def weights(self, step):
    """(alpha, temperature) at `step` under config.distill's schedule."""
    d, steps = self.exp.distill, self.exp.train.steps
    return (schedule_value(d.alpha, d.alpha_end, d.schedule, step, steps),
            schedule_value(d.temperature, d.temperature_end, d.schedule, step, steps))

  def teacher_prediction(self, variables: dict, batch: dict, *, rng, hidden: bool):
    """(logits, hidden states or None) of the online teacher on the student's inputs, in eval
    mode, never differentiated."""
    prediction = self.teacher_task.predict(self.teacher_model, variables, batch, rng=rng,
                                           train=False, hidden=hidden)
    return jax.lax.stop_gradient((prediction.logits, prediction.hidden))

  def loss(self, model, variables, batch, *, rng, train):
    variables = dict(variables)
    teacher = variables.pop(TEACHER, None)
    projection = variables["params"].get(PROJECTION)
    variables["params"] = without_projection(variables["params"])
    student_batch = {k: v for k, v in batch.items() if k not in (TOPK_VALUES, TOPK_IDS)}
    match_hidden = projection is not None
    student = self.student.predict(model, variables, student_batch, rng=rng, train=train,
                                   hidden=match_hidden)
    if teacher is None:
      raise ValueError(f"a distilled loss needs the {TEACHER!r} collection (train state's "
                       "teacher field)")
    alpha, temperature = self.weights(teacher["step"])
    if TOPK_VALUES in batch:
      kl, _ = objective.topk_kl_sum(batch[TOPK_VALUES], batch[TOPK_IDS], student.logits,
                                    student.mask, temperature)
    else:
      teacher_logits, teacher_hidden = self.teacher_prediction(
          teacher["variables"], student_batch, rng=rng, hidden=match_hidden)
      kl, _ = objective.kl_sum(teacher_logits, student.logits, student.mask, temperature)
    task = student.terms
    combined = objective.combined(alpha, kl, task.loss_sum)
    sums = {**task.sums, "task_loss_sum": task.loss_sum, "distill_sum": kl}
    if match_hidden:
      hidden_sum = objective.projected_mse_sum(student.hidden, projection["kernel"],
                                               teacher_hidden, student.mask)
      combined = combined + self.exp.distill.hidden_weight * hidden_sum
      sums["hidden_sum"] = hidden_sum
    return LossTerms(combined, task.weight, sums, task.model_state)

  def report(self, sums):
    sums = dict(sums)
    combined, kl = sums["loss_sum"], sums.pop("distill_sum")
    sums["loss_sum"] = sums.pop("task_loss_sum")
    hidden = sums.pop("hidden_sum", None)
    weight = max(float(sums["weight"]), 1.0)
    report = {**self.student.report(sums), "distill_kl": float(kl) / weight,
              "combined_loss": float(combined) / weight}
    if hidden is not None:
      report["hidden_mse"] = float(hidden) / weight
    return report
