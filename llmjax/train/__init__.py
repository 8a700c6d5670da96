"""Training: state, pure steps, and the loop (`llmjax.train.run(config)`)."""


def run(experiment, workdir):
  """Run (or resume) an experiment in a workdir; see llmjax.train.loop.run."""
  from llmjax.train import loop  # deferred: the loop brings orbax and the data stack
  return loop.run(experiment, workdir)


__all__ = ["run"]
