#!/usr/bin/env bash
# Several llmjax processes on this machine, talking over loopback (a stand-in for a pod).
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS --config=... --workdir=... [--config.x=y]
# Each process simulates DEVICES_PER_PROCESS CPU devices; the mesh spans all of them.
set -euo pipefail
n=$1; devices=$2; shift 2
port=$((20000 + RANDOM % 20000))
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    "$(dirname "$0")/../.venv/bin/llmjax" train "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$n" --process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
