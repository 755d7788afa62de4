#!/usr/bin/env bash
# Scaling over the GPUs of one host: the DiMSUM-L/2 and DiT-L/2 training steps at 256 px on 1, 2,
# 4 and 8 GPUs (as many as the host has), data parallel (mesh fsdp=1) and fully sharded (fsdp =
# number of GPUs), with the global batch fixed at 256 (strong scaling) and at 256 per GPU (weak
# scaling). Each setting is the step `python -m dimsum_jax.main` runs (benchmarks/train_step.py);
# then one profile per model on all GPUs gives the share of the step in all-reduce / all-gather /
# reduce-scatter kernels (category "collectives" of benchmarks/profile_step.py).
#
#   benchmarks/multi_gpu.sh OUT_DIR            (from the repository root, package importable)
#   SMOKE=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
#     benchmarks/multi_gpu.sh OUT_DIR          (tiny models on 8 fake CPU devices: the plumbing)
#
# Writes OUT_DIR/results.jsonl, OUT_DIR/log.txt, OUT_DIR/profile_<model>.json and prints the
# table (images/s, efficiency against 1 GPU, peak memory per GPU). NVLink multicast stays off
# (NCCL_NVLS_ENABLE=0), as the machines of this benchmark require.
set -u
out=${1:?usage: benchmarks/multi_gpu.sh OUT_DIR}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
mkdir -p "$out"
log="$out/log.txt"
results="$out/results.jsonl"
limit=${STEP_LIMIT:-300}
count=$("$py" -c "import jax; print(jax.device_count())")
models=${MODELS:-DiMSUM-L/2 DiT-L/2}
per_gpu=${PER_GPU_BATCH:-256}
smoke=${SMOKE:+--smoke}
if [ -n "$smoke" ]; then per_gpu=4; fi

run() {  # label, then train_step.py arguments
  local label=$1
  shift
  echo "== $(date -u +%H:%M:%S) $label: $*" | tee -a "$log"
  timeout -k 15 "$limit" "$py" benchmarks/train_step.py --repeats 5 --out "$results" $smoke \
    "$@" >>"$log" 2>&1
  echo "== $(date -u +%H:%M:%S) $label: exit $?" | tee -a "$log"
}

for model in $models; do
  for n in 1 2 4 8; do
    [ "$n" -gt "$count" ] && break
    run "strong $model n=$n dp" --models "$model" --devices "$n" --batch "$per_gpu"
    if [ "$n" -gt 1 ]; then
      run "weak $model n=$n dp" --models "$model" --devices "$n" --batch $((per_gpu * n))
    fi
    if [ "$n" -gt 1 ]; then
      run "weak $model n=$n fsdp" --models "$model" --devices "$n" --fsdp "$n" \
        --batch $((per_gpu * n))
      run "strong $model n=$n fsdp" --models "$model" --devices "$n" --fsdp "$n" \
        --batch "$per_gpu"
    fi
  done
  tag=$(echo "$model" | tr '/' '_')
  echo "== $(date -u +%H:%M:%S) profile $model on $count devices" | tee -a "$log"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout -k 15 "$limit" "$py" \
    benchmarks/profile_step.py --model "$model" --batch $((per_gpu * count)) $smoke \
    --summary "$out/profile_$tag.json" >>"$log" 2>&1
  echo "== profile exit $?" | tee -a "$log"
done

"$py" - "$results" "$per_gpu" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
per_gpu = int(sys.argv[2])
rows = [r for r in rows if r.get("benchmark") == "train_step" and "images_per_s" in r]
one = {r["model"]: r["images_per_s"] for r in rows
       if r["mesh"]["data"] * r["mesh"]["fsdp"] == 1 and r["global_batch"] == per_gpu}
# Efficiency: images/s over N x the 1-GPU images/s at the per-GPU batch (weak scaling: the same
# work per GPU; strong scaling: the same global batch, so N GPUs each get 1/N of it).
print("| model | scaling | GPUs | mesh | global batch | images/s | efficiency | peak GiB per GPU |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
  n = r["mesh"]["data"] * r["mesh"]["fsdp"]
  kind = "strong" if r["global_batch"] == per_gpu else "weak"
  ref = one.get(r["model"])
  eff = f"{100 * r['images_per_s'] / (n * ref):.0f}%" if ref else "-"
  mem = r.get("memory") or {}
  peak = max(mem.get("peak_gib_per_device") or [mem.get("peak_gib") or float("nan")])
  print(f"| {r['model']} | {kind} | {n} | data {r['mesh']['data']} x fsdp {r['mesh']['fsdp']} "
        f"| {r['global_batch']} | {r['images_per_s']:.1f} | {eff} | {peak:.1f} |")
PY
