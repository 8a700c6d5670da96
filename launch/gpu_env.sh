# shellcheck shell=bash # (sourced, not executed: no shebang)
# XLA and runtime settings for training on NVIDIA GPUs. Source it before starting llmjax:
#   source launch/gpu_env.sh && .venv/bin/llmjax train --config=... --workdir=...
# It appends to XLA_FLAGS (flags already set there come first) and keeps a preset
# XLA_PYTHON_CLIENT_MEM_FRACTION. Every flag exists in the pinned jaxlib (tests/test_launch.py
# starts jax with them: an unknown flag aborts jax at start-up). They are starting points, not
# settings measured on this project's workloads yet: benchmarks/gpu_run.sh times one step with
# and without them (benchmarks/RESULTS.md, "GPU"). Sources: the jax "GPU performance tips" page
# and NVIDIA JAX-Toolbox's "Environment Variables" and "GPU performance" pages.
llmjax_gpu_flags=(
  # Let the scheduler move collectives (FSDP all-gathers, gradient reduce-scatters and
  # all-reduces) so that they overlap with compute instead of waiting in program order.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # GEMMs through cuBLAS rather than Triton-generated kernels (JAX-Toolbox's image default).
  --xla_gpu_enable_triton_gemm=false
  # Merge many small collectives (one per parameter) into few large ones, up to 128 MiB each.
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  # With nn.scan over layers: gather the next layer's parameters, and reduce the previous
  # layer's gradients, while this layer computes.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
)
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${llmjax_gpu_flags[*]}"
# XLA preallocates this fraction of GPU memory; the rest is left to cuDNN/cuBLAS workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
unset llmjax_gpu_flags
