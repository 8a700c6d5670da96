"""XLA compile options the train and eval steps are jitted with, chosen per backend and model.

On XLA:CPU (jaxlib 0.10) the default YNNPACK fusions merge a dot with its elementwise neighbours
into one kernel; for the small matmuls of CPU-sized Transformers that kernel is slower than a
plain dot followed by XLA's own loop fusion. At the main job's shape (Llama-style, 4 x 256, seq
128, batch 32, 2 cores; one process per setting, idle host): 1.22 -> 1.04 s per train step
without biases, 1.14 -> 1.03 s with them (benchmarks/RESULTS.md). That is the backend's default
here.

A model whose step wants other options declares them as a class attribute
`compile_options = {platform: {option: value}}` (the ResNet does: YNNPACK's reductions for its
BatchNorm statistics, benchmarks/RESULTS.md "ResNet (CPU)"); they override the backend's
defaults key by key, so the choice lives with the model and nothing here names a model kind.
Options are passed per compilation, never through XLA_FLAGS, so other platforms and user flags
are untouched.
"""

from __future__ import annotations

import jax

_BY_PLATFORM: dict[str, dict[str, str]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


def compiler_options(mesh: jax.sharding.Mesh, model=None) -> dict[str, str]:
  """Options for `jax.jit(..., compiler_options=...)` of a step of `model` that runs on `mesh`."""
  platform = mesh.devices.flat[0].platform
  preferred = getattr(model, "compile_options", None) or {}
  return {**_BY_PLATFORM.get(platform, {}), **preferred.get(platform, {})}
