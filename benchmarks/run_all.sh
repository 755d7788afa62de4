#!/usr/bin/env bash
# The GPU benchmarks behind BENCHMARKS.md, one stage after another, each under its own time limit.
#
#   benchmarks/run_all.sh OUT_DIR [STAGE ...]   stages: train baseline sample precast encode evaluate
#                                               scaling profile profile_dit lowering inference_unroll
#                                               hoist_adaln sampler_flags time_segments
#                                               (default: train sample scaling profile)
# Writes OUT_DIR/results.jsonl (one JSON object per setting, every stage), OUT_DIR/log.txt (all
# output), OUT_DIR/profile.json (the DiMSUM-L/2 step's kernel time by category, with its compiled
# HLO in dimsum_step_hlo.txt.gz) and OUT_DIR/gpu.txt (nvidia-smi). About 25 minutes on an H200. Run from the repository root with the package importable.
# SMOKE=1 passes --smoke to every script (tiny models; checks the plumbing on a CPU);
# SAMPLE_ARGS / SCALING_ARGS add flags to sample.py / scaling.py; *_LIMIT set the time limits.
set -u
out=${1:?usage: benchmarks/run_all.sh OUT_DIR [train|sample|encode|scaling ...]}
shift
stages=${*:-train sample scaling profile}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}  # as main.py
mkdir -p "$out"
log="$out/log.txt"
results="$out/results.jsonl"

# name, time limit (s), then the python arguments
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $(date -u +%H:%M:%S) $name: $*" | tee -a "$log"
  timeout -k 15 "$limit" "$py" "$@" ${SMOKE:+--smoke} >>"$log" 2>&1
  local rc=$?
  echo "== $(date -u +%H:%M:%S) $name: exit $rc$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
  --format=csv >"$out/gpu.txt" 2>&1 || true

for stage in $stages; do
  case $stage in
    train)  # the defaults: what python -m dimsum_jax.main runs
      step train_dimsum "${TRAIN_DIMSUM_LIMIT:-240}" benchmarks/train_step.py \
        --models DiMSUM-L/2 --repeats 6 --out "$results"
      step train_dit "${TRAIN_DIT_LIMIT:-120}" benchmarks/train_step.py \
        --models DiT-L/2 --repeats 6 --out "$results" ;;
    baseline)  # the defaults before the fast path: jaxwt Haar, XLA attention, no recomputation
      step baseline_dimsum "${LEVER_LIMIT:-300}" benchmarks/train_step.py --models DiMSUM-L/2 \
        --wavelet-impl jaxwt --attention-impl xla --remat none --repeats 6 --out "$results"
      step baseline_dit "${LEVER_LIMIT:-300}" benchmarks/train_step.py --models DiT-L/2 \
        --attention-impl xla --remat none --repeats 6 --out "$results" ;;
    sample)
      step sample "${SAMPLE_LIMIT:-420}" benchmarks/sample.py --repeats 5 --warmup 1 \
        ${SAMPLE_ARGS:-} --out "$results" ;;
    profile)  # command buffers off: every kernel event then names its HLO instruction
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
        step profile "${PROFILE_LIMIT:-240}" benchmarks/profile_step.py --top 80 \
        --summary "$out/profile.json" --hlo-out "$out/dimsum_step_hlo.txt.gz"
      step matmul_peak 60 -c "from benchmarks import common; import json; print(json.dumps(
        {'benchmark': 'matmul_peak', 'bf16_tflops': common.matmul_peak() / 1e12,
         **common.environment()}))" ;;
    profile_dit)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
        step profile_dit "${PROFILE_DIT_LIMIT:-120}" benchmarks/profile_step.py --model DiT-L/2 \
        --top 60 --summary "$out/profile_dit.json" --hlo-out "$out/dit_step_hlo.txt.gz" ;;
    encode)
      if [ -f benchmarks/encode.py ]; then
        echo "== $(date -u +%H:%M:%S) encode: benchmarks/encode.py" | tee -a "$log"
        timeout -k 15 "${ENCODE_LIMIT:-150}" "$py" benchmarks/encode.py ${SMOKE:+--smoke} \
          2>>"$log" | tee -a "$log" | grep '^{' >>"$results"
        echo "== $(date -u +%H:%M:%S) encode: exit ${PIPESTATUS[0]}" | tee -a "$log"
      else
        echo "== encode: benchmarks/encode.py not found, skipped" | tee -a "$log"
      fi ;;
    evaluate)  # the Inception features of the evaluation (target: >= 2000 images/s at 256 px)
      step evaluate "${EVALUATE_LIMIT:-240}" benchmarks/evaluate_features.py --out "$results" ;;
    precast)  # change S1: the weights cast once per sampled batch, and cast in every evaluation
      for cast in on off; do
        for cfg in 1.0 1.4; do
          step "sample_precast_${cast}_cfg${cfg}" "${PRECAST_LIMIT:-150}" benchmarks/sample.py \
            --skip-forward --sample-sizes 256 --cfg-scale "$cfg" --repeats 5 --warmup 1 \
            $([ $cast = off ] && echo --no-precast) --out "$results"
        done
      done ;;
    inference_unroll)  # change S3: the sampler's block groups unrolled (model.inference_scan_unroll=0)
      for unroll in 1 0; do
        for cfg in 1.0 1.4; do
          step "sample_inference_unroll${unroll}_cfg${cfg}" "${UNROLL_LIMIT:-240}" benchmarks/sample.py \
            --skip-forward --sample-sizes 256 --cfg-scale "$cfg" --repeats 5 --warmup 1 \
            --inference-scan-unroll "$unroll" --out "$results"
        done
      done ;;
    hoist_adaln)  # the adaLN Linears of all block groups as one batched matmul per block position
      for hoist in off on; do
        for cfg in 1.0 1.4; do
          step "sample_hoist_adaln_${hoist}_cfg${cfg}" "${HOIST_LIMIT:-150}" benchmarks/sample.py \
            --skip-forward --sample-sizes 256 --cfg-scale "$cfg" --repeats 5 --warmup 1 \
            $([ $hoist = on ] && echo --inference-hoist-adaln) --out "$results"
        done
      done ;;
    time_segments)  # batch-1 scans as up to 8 segments per row in two kernel calls: the call
      # alone (seconds), then the sampler
      step scan_segments "${SCAN_SEGMENTS_LIMIT:-90}" benchmarks/scan_segments.py --out "$results"
      for segments in 1 8; do
        for cfg in 1.0 1.4; do
          step "sample_time_segments${segments}_cfg${cfg}" "${SEGMENTS_LIMIT:-150}" benchmarks/sample.py \
            --skip-forward --sample-sizes 256 --cfg-scale "$cfg" --repeats 5 --warmup 1 \
            --time-segments "$segments" --out "$results"
        done
      done ;;
    sampler_flags)  # XLA flags for the batch-1 sampler, against its defaults on one machine:
      # graphs: the dopri5 loop and the block-group scan captured in command buffers (CUDA graphs);
      # library: GEMMs through cuBLAS, so that dynamic-slice fusion can read each block group's
      # weights in place instead of copying a slice of the stacked weights (S4 alone: no gain).
      graphs=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL
      for variant in default graphs library; do
        case $variant in
          default) extra= ;;
          graphs) extra="--xla_gpu_enable_command_buffer=$graphs" ;;
          library) extra="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true" ;;
        esac
        flags=${XLA_FLAGS:-}
        [ -n "$extra" ] && flags="${flags:+$flags }$extra"
        for cfg in 1.0 1.4; do
          XLA_FLAGS="$flags" step "sample_flags_${variant}_cfg${cfg}" "${FLAGS_LIMIT:-150}" \
            benchmarks/sample.py --skip-forward --sample-sizes 256 --cfg-scale "$cfg" --repeats 5 \
            --warmup 1 --out "$results"
        done
      done ;;
    lowering)  # the Python half of the DiMSUM-L/2 step's compile (runs on a CPU as well)
      step lowering "${LOWERING_LIMIT:-300}" benchmarks/lowering.py --out "$results" ;;
    scaling)
      step scaling "${SCALING_LIMIT:-420}" benchmarks/scaling.py ${SCALING_ARGS:-} \
        --out "$results" ;;
    *)
      echo "unknown stage $stage (train baseline sample precast encode evaluate scaling profile profile_dit lowering inference_unroll hoist_adaln sampler_flags time_segments)" >&2
      exit 2 ;;
  esac
done
