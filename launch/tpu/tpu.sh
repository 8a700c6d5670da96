#!/usr/bin/env bash
# llmjax on a Cloud TPU VM slice, from your workstation (gcloud installed and logged in).
#
#   launch/tpu/tpu.sh [OPTIONS] create          # a TPU VM slice, or a queued request for one
#   launch/tpu/tpu.sh [OPTIONS] status          # its state (a queued one is usable once ACTIVE)
#   launch/tpu/tpu.sh [OPTIONS] sync            # this repository's HEAD to every worker + install
#   launch/tpu/tpu.sh [OPTIONS] train --config=experiments/lm/stdlib_gpt.py --workdir=/shared/gpt
#   launch/tpu/tpu.sh [OPTIONS] run -- CMD ...  # any command on every worker, in the repository
#   launch/tpu/tpu.sh [OPTIONS] stop | delete   # stop the VMs (disks kept) / delete them
#
# OPTIONS (or the variables in brackets; defaults after '='):
#   --name=NAME                 [TPU_NAME=llmjax]
#   --zone=ZONE                 [TPU_ZONE=us-central2-b]
#   --accelerator-type=TYPE     [TPU_TYPE=v4-16: 2 hosts of 4 chips]
#   --version=RUNTIME_VERSION   [TPU_VERSION=tpu-ubuntu2204-base; v5e, v5p and v6e take others,
#                                listed on Cloud TPU's "runtime versions" page]
#   --project=PROJECT           [TPU_PROJECT=gcloud's default]
#   --queued                    [TPU_QUEUED=1] request through a queued resource (waits for
#                                capacity instead of failing; delete removes request and VMs)
#   --spot                      [TPU_SPOT=1] Spot capacity: cheaper, preemptible
#   --repo-dir=DIR              [TPU_REPO_DIR=llmjax] the repository on each worker (relative to
#                                the home directory), where `sync` puts it and `run` cds to
#
# `sync` ships the committed HEAD (not uncommitted edits) and installs llmjax with a TPU build of
# jax into DIR/.venv; the worker's python3 must be 3.11 or newer. `train` and `run` work on every
# host of the slice at once and return when all have finished, with the highest exit status. No
# coordinator flags: on a TPU VM jax finds the slice's hosts itself. Expect one line per host:
#   cluster from gcetpu: process 1 of 2, coordinator 10.130.0.12:8476; 4 local / 8 global tpu devices
# (`run -- .venv/bin/python -m llmjax.distributed` prints just that line: a check of the slice in
# seconds). --workdir must be a directory every host mounts at the same path (a Filestore / NFS
# share, or a bucket mounted with gcsfuse): each host writes its part of every checkpoint, and
# llmjax stops before training if they cannot all see it. A run that was cut off (a preempted
# Spot slice, once created again; a dropped ssh session) resumes from its last checkpoint when the
# same `train` command runs again; it first kills whatever is left of the old run.
set -euo pipefail

name=${TPU_NAME:-llmjax}
zone=${TPU_ZONE:-us-central2-b}
accelerator_type=${TPU_TYPE:-v4-16}
version=${TPU_VERSION:-tpu-ubuntu2204-base}
project=${TPU_PROJECT:-}
queued=${TPU_QUEUED:-0}
spot=${TPU_SPOT:-0}
repo_dir=${TPU_REPO_DIR:-llmjax}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}

while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator-type=*) accelerator_type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo-dir=*) repo_dir=${1#*=} ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    *) echo "tpu.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -gt 0 ]] || usage
subcommand=$1; shift

where=(--zone="$zone")
if [[ -n $project ]]; then where+=(--project="$project"); fi
extra=()
if [[ $spot == 1 ]]; then extra+=(--spot); fi

# Runs on each worker (sent by `declare -f`) before a command that takes the TPU. A run whose ssh
# session was cut (Ctrl-C, a dropped connection) can leave python processes holding the chips,
# and one that crashed can leave libtpu's lock file behind: the next run would then fail with
# "TPU in use" or hang. So: kill whatever holds a TPU device file (v2-v4: /dev/accel*, v5e and
# later: /dev/vfio/N) rather than processes matched by name, which could be this very shell, and
# remove the lock file. With sudo, because the stale process may be another user's (the VM's
# users have passwordless sudo; -n: fail rather than wait for a password nobody can type, and
# the command then runs anyway and reports the busy TPU itself). Only where such device files
# exist: anywhere else (a test's stand-in workers) nothing is killed. /tmp/tpu_logs is kept: it
# says why the last run died.
free_tpu() {
  local devices=() device
  for device in /dev/accel* /dev/vfio/[0-9]*; do
    if [[ -e $device ]]; then devices+=("$device"); fi
  done
  if [[ ${#devices[@]} -eq 0 ]]; then return 0; fi
  sudo -n fuser -s -k "${devices[@]}" || true  # fuser fails when nothing held them
  for _ in 1 2 3 4 5 6 7 8 9 10; do  # SIGKILL is sent, not waited for
    sudo -n fuser -s "${devices[@]}" || break
    sleep 1
  done
  sudo -n rm -f /tmp/libtpu_lockfile
}

on_all_workers() {  # one shell command line, on every host of the slice at once
  gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

in_repo() {  # the words "$@", quoted for the remote shell, run in the repository there
  printf 'cd %q && %s' "$repo_dir" "$(printf '%q ' "$@")"
}

case $subcommand in
  create)
    if [[ $queued == 1 ]]; then
      gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}" \
        --accelerator-type="$accelerator_type" --runtime-version="$version" "${extra[@]}"
      echo "queued: '$0 status' shows the request; the slice is usable once it is ACTIVE" >&2
    else
      gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
        --accelerator-type="$accelerator_type" --version="$version" "${extra[@]}"
    fi ;;
  status)
    if [[ $queued == 1 ]]; then
      gcloud compute tpus queued-resources describe "$name" "${where[@]}"
    else
      gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
    fi ;;
  sync)
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    git -C "$(dirname "$0")/../.." archive --format=tar.gz --output="$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$name:llmjax.tar.gz" "${where[@]}" --worker=all
    dir=$(printf %q "$repo_dir")
    on_all_workers "mkdir -p $dir && tar -xzf llmjax.tar.gz -C $dir && rm llmjax.tar.gz && \
cd $dir && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && \
.venv/bin/pip install -q -c constraints.txt -e . 'jax[tpu]'" ;;
  train)
    on_all_workers "$(declare -f free_tpu); free_tpu; $(in_repo .venv/bin/llmjax train "$@")" ;;
  run)
    if [[ ${1:-} == -- ]]; then shift; fi
    [[ $# -gt 0 ]] || usage
    on_all_workers "$(declare -f free_tpu); free_tpu; $(in_repo "$@")" ;;
  stop)
    gcloud compute tpus tpu-vm stop "$name" "${where[@]}" ;;
  delete)
    if [[ $queued == 1 ]]; then  # --force: the slice goes with the request
      gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
    else
      gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    fi ;;
  *) echo "tpu.sh: unknown subcommand $subcommand" >&2; usage ;;
esac
