#!/usr/bin/env bash
# Runs training on every worker of a Cloud TPU pod slice; each worker is one JAX process
# (jax.distributed.initialize detects the pod by itself) and reads only its share of the data.
#
#   TPU=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh configs/imagenet256.py gs://bucket/runs/in256 \
#       --config.data.data_dir=gs://bucket/latents/imagenet256
#
# The workdir and the data must be on storage every worker sees (a GCS bucket). The repository
# is expected at ~/dimsum_jax on each worker; on the first run, SETUP=1 copies this checkout to
# every worker and installs it with jax[tpu].
set -euo pipefail
config=${1:?usage: TPU=NAME ZONE=ZONE launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: TPU=NAME ZONE=ZONE launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"
}
if [[ "${SETUP:-0}" == 1 ]]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  tar -C "$here" --exclude=.git --exclude=runs -czf /tmp/dimsum_jax_src.tgz .
  gcloud compute tpus tpu-vm scp /tmp/dimsum_jax_src.tgz "$TPU":~/ --zone="$ZONE" --worker=all
  ssh_all 'mkdir -p ~/dimsum_jax && tar -C ~/dimsum_jax -xzf ~/dimsum_jax_src.tgz &&
           pip install -U "jax[tpu]" && pip install -e ~/dimsum_jax'
fi
extra=$(printf ' %q' "$@")
ssh_all "cd ~/dimsum_jax && python -m dimsum_jax.main --config=$config --workdir=$workdir$extra"
