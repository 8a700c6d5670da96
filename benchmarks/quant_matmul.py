"""int8 weights in one DenseGeneral-sized matmul ([rows, 256] x [256, 704], the main job's MLP):
float32 vs dequantize-on-the-fly vs int8 x int8 -> int32 dot, medians of 30 interleaved calls.

  .venv/bin/python benchmarks/quant_matmul.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np


from llmjax.models import quant as Q
rng = np.random.default_rng(0)
w = jnp.asarray(rng.normal(size=(256, 704)).astype(np.float32)) * 0.02
res = {}
for rows in (1, 8 * 128):
  x = jnp.asarray(rng.normal(size=(rows, 256)).astype(np.float32))
  spec = Q.parse("int8"); st = Q.quantize(w, 1, spec)
  fns = {"float32": jax.jit(lambda x, w: x @ w),
         "int8 dequant": jax.jit(lambda x, st: Q.dot(x, st, spec, (1,), "dequant", jnp.float32)),
         "int8 int32-dot": jax.jit(lambda x, st: Q.dot(x, st, spec, (1,), "int8", jnp.float32))}
  args = {"float32": (x, w), "int8 dequant": (x, st), "int8 int32-dot": (x, st)}
  for k in fns: fns[k](*args[k]).block_until_ready()
  times = {k: [] for k in fns}
  for _ in range(30):
    for k in fns:
      t = time.perf_counter(); fns[k](*args[k]).block_until_ready(); times[k].append(time.perf_counter() - t)
  med = {k: float(np.median(v)) for k, v in times.items()}
  res[rows] = {k: (round(v * 1e6, 1), round(med["float32"] / v, 3)) for k, v in med.items()}
print(res)
