"""llmjax: pure-function JAX/Flax models and training on one sharding, checkpoint and data stack."""

from llmjax import platforms
from llmjax.errors import UserError

platforms.cpu_only_without_tpu_chips()  # before any jax backend starts (platforms.py says why)

__all__ = ["UserError"]
__version__ = "0.1.0"
