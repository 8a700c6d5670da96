"""llmjax sample --workdir=DIR --n=64 --out=FILE.png [--seed=S] [--step=N]

Draws --n new images from a trained GAN run (the `gan` task) and writes them as one PNG grid: the
generator in eval mode (its BatchNorm running statistics) on latents z ~ N(0, I) drawn from
--seed, so the same seed and checkpoint give the same images.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from llmjax.cli import common

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A gan training run's directory.",
                               flag_values=FLAGS)
_N = flags.DEFINE_integer("n", 64, "How many images to draw.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "The PNG file to write the grid to.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the latents.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest verified).",
                             flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  if not _WORKDIR.value or not _OUT.value:
    common.fail("--workdir=DIR and --out=FILE.png are required")
  if _N.value < 1:
    common.fail(f"--n={_N.value}: draw at least 1 image")
  if not _OUT.value.lower().endswith(".png"):
    common.fail(f"--out={_OUT.value}: the grid is written as PNG; name a .png file")
  with common.user_errors():
    path = sample(_WORKDIR.value, _N.value, _OUT.value, _SEED.value, _STEP.value)
  print(f"wrote {_N.value} samples to {path}")


def sample(workdir: str, n: int, out: str, seed: int = 0, step: int | None = None) -> str:
  """Draw n images from the run's checkpoint and write their grid to `out`; returns its path."""
  # heavy imports only after the flags are known to be good
  from llmjax import distributed, tasks
  from llmjax.errors import UserError
  from llmjax.eval import plots
  from llmjax.train import rundir
  exp = rundir.experiment(workdir)
  if not tasks.supports(rundir.task(workdir, exp), tasks.Samples):
    raise UserError(f"--workdir={workdir}: a {exp.task.name!r} run draws no samples; "
                    "llmjax sample takes a run of the gan task")
  run = rundir.restore(workdir, step)
  variables = distributed.to_host({"params": run.params, **run.state.model_state})
  images = run.task.sample(run.model, variables, n, seed)
  plots.image_grid(images, out)
  return os.path.abspath(out)

if __name__ == "__main__":
  main()
