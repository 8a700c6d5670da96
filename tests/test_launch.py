"""launch/gpu_env.sh: its XLA flags exist in the pinned jaxlib and it keeps the user's settings."""

import os
import pathlib
import subprocess
import sys

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"

# Starts jax and prints the flags it was given; jax aborts at start-up on an unknown XLA flag.
START_JAX = "import os, jax; jax.numpy.zeros(3).block_until_ready(); print(os.environ['XLA_FLAGS'])"


def start_jax_under_gpu_env(extra_flags: str = "") -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=extra_flags,
             XLA_PYTHON_CLIENT_MEM_FRACTION="0.75")
  script = f'source "{LAUNCH / "gpu_env.sh"}" && echo "fraction=$XLA_PYTHON_CLIENT_MEM_FRACTION" ' \
           f'&& "{sys.executable}" -c "{START_JAX}"'
  return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                        timeout=120)


def test_gpu_env_flags_are_known_to_jaxlib_and_user_settings_stay():
  done = start_jax_under_gpu_env("--xla_force_host_platform_device_count=2")
  assert done.returncode == 0, done.stderr[-2000:]
  fraction, flags = done.stdout.strip().splitlines()
  assert fraction == "fraction=0.75"  # a preset value is kept
  assert flags.startswith("--xla_force_host_platform_device_count=2 ")  # user flags first
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags.split()


def test_the_same_check_fails_on_an_unknown_flag():
  done = start_jax_under_gpu_env("--xla_gpu_no_such_flag_in_any_jaxlib=true")
  assert done.returncode != 0
  assert "xla_gpu_no_such_flag_in_any_jaxlib" in done.stderr
