"""XLA compile options the train and eval steps are jitted with, chosen per backend.

On XLA:CPU (jaxlib 0.10) the default YNNPACK fusions merge a dot with its elementwise neighbours
into one kernel; for the small matmuls of CPU-sized Transformers that kernel is slower than a
plain dot followed by XLA's own loop fusion. Measured side by side on the main job's shape
(Llama-style, 4 x 256, seq 128, batch 32, 2 cores, interleaved steps): 1.22 -> 1.04 s per train
step without biases, 1.14 -> 1.03 s with them (see benchmarks/RESULTS.md). Options are passed
per compilation, never through XLA_FLAGS, so other backends and user flags are untouched.
"""

from __future__ import annotations

import jax

_BY_BACKEND: dict[str, dict[str, str]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: jax's default)."""
  return dict(_BY_BACKEND.get(backend or jax.default_backend(), {}))
