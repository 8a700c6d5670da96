"""llmjax: pure-function JAX/Flax models and training on one sharding, checkpoint and data stack."""

from llmjax.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
