"""Training: state, pure steps, and the loop (`llmjax.train.run(config)`)."""

from llmjax.train.loop import run

__all__ = ["run"]
