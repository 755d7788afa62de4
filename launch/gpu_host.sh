#!/usr/bin/env bash
# One process drives every GPU of this host; the mesh spans them all (config.mesh).
#
#   launch/gpu_host.sh configs/imagenet256.py runs/imagenet256 [--config.key=value ...]
#
# Restart the same command after a crash or preemption: training resumes from the newest good
# checkpoint in the workdir.
set -euo pipefail
config=${1:?usage: launch/gpu_host.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: launch/gpu_host.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
# Let XLA take most of the GPU memory up front, as the Flax examples do.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec python -m dimsum_jax.main --config="$config" --workdir="$workdir" "$@"
