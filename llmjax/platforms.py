"""Which JAX backends a process may start, decided before jax starts any.

`make install` (and the `tpu` extra) installs libtpu so that `llmjax compile` can compile for
TPU topologies on any host. But jax then tries the TPU runtime in every process, and on a host
with no TPU chip libtpu prints a screen of errors (host bounds, worker hostnames) before jax falls
back to the CPU. Where that would happen and nothing else could be meant, the process is told to
use the CPU: JAX_PLATFORMS unset, libtpu installed, no TPU chip on the PCI bus, and no GPU plugin
installed. Anything else is left to jax. Compiling for an abstract TPU topology does not use the
runtime backend, so `llmjax compile` works either way. Pure Python: jax is not imported here
(a jax the process already imported is configured instead).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (jax's own check reads the same files)
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                "jax_plugins")


def _has_tpu_chip() -> bool:
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def cpu_only_without_tpu_chips() -> None:
  """Set JAX_PLATFORMS=cpu on a host where jax would only try libtpu and then fall back."""
  if "JAX_PLATFORMS" in os.environ or not _installed("libtpu"):
    return
  if any(_installed(m) for m in _GPU_PLUGINS) or _has_tpu_chip():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  # jax reads JAX_PLATFORMS when it is imported: a script that imported jax before llmjax (the
  # benchmarks do) is told through its config instead, which holds until a backend starts.
  jax = sys.modules.get("jax")
  if jax is not None:
    jax.config.update("jax_platforms", "cpu")
