"""The benchmarks' own logic: kernel-time categories of a profile, FLOP counts."""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks import profile_step  # noqa: E402
from dimsum_jax import models  # noqa: E402

# A compiled module's text as XLA prints it: stack-frame tables (parent ids printed one above the
# parent's own id, 0 = none), fused computations, and an entry calling them.
HLO = '''HloModule jit_step, is_scheduled=true

FileNames
1 "/src/dimsum_jax/train.py"
2 "/src/dimsum_jax/models/layers.py"
3 "/src/dimsum_jax/ops/selective_scan.py"
4 "/src/dimsum_jax/models/mamba.py"
5 "/site/jaxwt/conv_transform_2.py"
6 "/site/optax/_src/transform.py"
7 "/src/dimsum_jax/models/dimsum.py"

FunctionNames
1 "train_step"
2 "attention"
3 "selective_scan_reference"
4 "MambaMixer.__call__"
5 "wavedec2"
6 "scale_by_adam"
7 "permute_tokens"
8 "SelfAttention.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=9}
2 {file_name_id=2 function_name_id=8 line=20 end_line=20 column=1 end_column=9}
3 {file_name_id=2 function_name_id=2 line=30 end_line=30 column=1 end_column=9}
4 {file_name_id=4 function_name_id=4 line=40 end_line=40 column=1 end_column=9}
5 {file_name_id=3 function_name_id=3 line=50 end_line=50 column=1 end_column=9}
6 {file_name_id=5 function_name_id=5 line=60 end_line=60 column=1 end_column=9}
7 {file_name_id=6 function_name_id=6 line=70 end_line=70 column=1 end_column=9}
8 {file_name_id=7 function_name_id=7 line=80 end_line=80 column=1 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}
4 {file_location_id=4 parent_frame_id=2}
5 {file_location_id=5 parent_frame_id=5}
6 {file_location_id=6 parent_frame_id=5}
7 {file_location_id=7 parent_frame_id=2}
8 {file_location_id=8 parent_frame_id=2}

%fused_attn (param_0: bf16[8,16]) -> f32[8,8] {
  %param_0 = bf16[8,16]{1,0} parameter(0)
  ROOT %dot.1 = f32[8,8]{1,0} dot(%param_0, %param_0), lhs_contracting_dims={1}, rhs_contracting_dims={1}, metadata={op_name="jit(step)/attn/dot_general" stack_frame_id=3}
}

%fused_proj (param_0.1: bf16[8,16]) -> f32[8,8] {
  %param_0.1 = bf16[8,16]{1,0} parameter(0)
  ROOT %dot.2 = f32[8,8]{1,0} dot(%param_0.1, %param_0.1), lhs_contracting_dims={1}, rhs_contracting_dims={1}, metadata={op_name="jit(step)/mixer/in_proj/dot_general" stack_frame_id=4}
}

%fused_scan (param_0.2: f32[8]) -> f32[8] {
  %param_0.2 = f32[8]{0} parameter(0)
  %exp.3 = f32[8]{0} exponential(%param_0.2), metadata={op_name="jit(step)/mixer/exp" stack_frame_id=5}
  ROOT %mul.4 = f32[8]{0} multiply(%exp.3, %param_0.2), metadata={op_name="jit(step)/mixer/mul" stack_frame_id=4}
}

%fused_wave (param_0.3: f32[1,8,8,4]) -> f32[1,4,4,4] {
  %param_0.3 = f32[1,8,8,4]{3,2,1,0} parameter(0)
  ROOT %conv.5 = f32[1,4,4,4]{3,2,1,0} convolution(%param_0.3, %param_0.3), window={size=2x2 stride=2x2}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(step)/wavelet/conv" stack_frame_id=6}
}

%fused_adam (param_0.4: f32[8], param_1.4: f32[8]) -> f32[8] {
  %param_0.4 = f32[8]{0} parameter(0)
  %param_1.4 = f32[8]{0} parameter(1)
  ROOT %add.6 = f32[8]{0} add(%param_0.4, %param_1.4), metadata={op_name="jit(step)/adam/add" stack_frame_id=7}
}

ENTRY %main.9 (Arg_0.1: bf16[8,16], Arg_1.2: f32[8]) -> (f32[8,8], f32[8]) {
  %Arg_0.1 = bf16[8,16]{1,0} parameter(0)
  %Arg_1.2 = f32[8]{0} parameter(1)
  %fusion.1 = f32[8,8]{1,0} fusion(%Arg_0.1), kind=kOutput, calls=%fused_attn, metadata={op_name="jit(step)/attn/dot_general" stack_frame_id=3}
  %fusion.2 = f32[8,8]{1,0} fusion(%Arg_0.1), kind=kCustom, calls=%fused_proj, metadata={op_name="jit(step)/mixer/in_proj/dot_general" stack_frame_id=4}
  %fusion.3 = f32[8]{0} fusion(%Arg_1.2), kind=kLoop, calls=%fused_scan, metadata={op_name="jit(step)/mixer/mul" stack_frame_id=4}
  %custom-call.4 = (f32[8]{0}, s8[16]{0}) custom-call(%Arg_1.2), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(step)/pallas_call" stack_frame_id=4}
  %fusion.5 = f32[1,4,4,4]{3,2,1,0} fusion(%Arg_1.2), kind=kLoop, calls=%fused_wave, metadata={op_name="jit(step)/wavelet/conv" stack_frame_id=6}
  %fusion.6 = f32[8]{0} fusion(%Arg_1.2, %Arg_1.2), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(step)/adam/add" stack_frame_id=7}
  %gather.7 = f32[8]{0} gather(%Arg_1.2, %Arg_1.2), offset_dims={}, metadata={op_name="jit(step)/take" stack_frame_id=8}
  %add.8 = f32[8]{0} add(%Arg_1.2, %Arg_1.2), metadata={op_name="jit(step)/add" stack_frame_id=1}
  %all-reduce.10 = f32[8]{0} all-reduce(%add.8), replica_groups={}, to_apply=%fused_adam, metadata={op_name="jit(step)/psum" stack_frame_id=7}
  ROOT %tuple.9 = (f32[8,8]{1,0}, f32[8]{0}) tuple(%fusion.1, %add.8)
}
'''

EXPECTED = {
  "fusion.1": ("attention", None),  # a GEMM written inside layers.attention
  "fusion.2": ("matmuls", None),  # the Mamba in_proj GEMM
  "fusion.3": ("scan", None),  # holds an op of selective_scan.py (inner frame)
  "custom-call.4": ("scan", None),  # the Pallas (Mosaic GPU) kernel
  "fusion.5": ("wavelet", None),  # a convolution of jaxwt: wavelet, not matmuls
  "fusion.6": ("other", "optimizer"),
  "gather.7": ("other", "permutes"),
  "add.8": ("other", "elementwise"),
  "all-reduce.10": ("collectives", None),  # the gradient all-reduce, whatever its stack
}


def test_hlo_index_reads_instructions_and_python_stacks():
  index = profile_step.hlo_index(HLO)
  assert index["fusion.3"]["opcode"] == "fusion"
  assert index["custom-call.4"]["opcode"] == "custom-call"
  assert index["custom-call.4"]["target"] == "mosaic_gpu_v2"
  assert index["fusion.2"]["calls"] == ["fused_proj"]
  assert index["__computations__"]["fused_scan"] == ["param_0.2", "exp.3", "mul.4"]
  # frame 4 (mamba) -> printed parent 2 = frame 1 (train_step); frame 1 has no parent.
  assert [(f.split("/")[-1], fn) for f, fn, _ in index["dot.2"]["stack"]] == [
    ("mamba.py", "MambaMixer.__call__"),
    ("train.py", "train_step"),
  ]
  assert [fn for _, fn, _ in index["exp.3"]["stack"]] == [
    "selective_scan_reference",
    "MambaMixer.__call__",
    "train_step",
  ]


def test_classify_by_stack_and_contents():
  index = profile_step.hlo_index(HLO)
  got = {name: profile_step.classify(name, index) for name in EXPECTED}
  assert got == EXPECTED
  # Under CUDA graphs the trace names the command buffer; the kernel's name gives the fusion.
  assert profile_step.instruction_of("fusion_3", "command_buffer_7", index) == "fusion.3"
  assert profile_step.instruction_of("any_kernel", "gather.7", index) == "gather.7"
  assert profile_step.instruction_of("sm90_xmma_gemm_bf16", "command_buffer_7", index) is None
  # Kernels the trace does not tie to an instruction fall back on their names.
  assert profile_step.classify("sm90_xmma_gemm_bf16", index) == ("matmuls", None)
  assert profile_step.classify("cudnn_fmha_fwd", index) == ("attention", None)
  assert profile_step.classify("memset32", index) == ("other", None)


def test_summarize_sums_kernel_time_per_step_and_category():
  rng = np.random.default_rng(0)
  index = profile_step.hlo_index(HLO)
  names = list(EXPECTED)
  events, by_cat, by_part = [], {c: 0.0 for c in profile_step.CATEGORIES}, {}
  for _ in range(40):
    name = names[rng.integers(len(names))]
    ms = float(rng.uniform(0.01, 3.0))
    events.append((f"kernel_{name}", name, ms))
    cat, part = EXPECTED[name]
    by_cat[cat] += ms
    if part:
      by_part[part] = by_part.get(part, 0.0) + ms
  steps = 4
  s = profile_step.summarize(events, index, steps, step_ms=100.0)
  total = sum(ms for *_, ms in events)
  for c in profile_step.CATEGORIES:
    assert math.isclose(s["categories_ms_per_step"][c], by_cat[c] / steps, rel_tol=1e-12)
    assert math.isclose(s["categories_share"][c], by_cat[c] / total, rel_tol=1e-12)
  for p in profile_step.OTHER_PARTS:
    assert math.isclose(
      s["other_parts_ms_per_step"][p], by_part.get(p, 0.0) / steps, rel_tol=1e-12, abs_tol=1e-15
    )
  assert math.isclose(s["kernel_ms_per_step"], total / steps, rel_tol=1e-12)
  assert math.isclose(s["idle_ms_per_step"], 100.0 - total / steps, rel_tol=1e-12)
  assert s["unmapped_ms_per_step"] == 0.0
  assert s["top_ops"][0]["ms_per_step"] == max(t["ms_per_step"] for t in s["top_ops"])


def test_training_flops_per_image():
  """6 x forward multiply-accumulates; DiT-L/2 at 256 px by the closed form of the DiT paper's
  accounting (embedders, 24 blocks of adaLN + attention + MLP, final layer)."""
  cfg = common.model_config("DiT-L/2", 32)
  n, d, depth, p, c = 256, 1024, 24, 2, 4
  macs = (
    n * c * p * p * d
    + 256 * d
    + d * d
    + 2 * d * d
    + n * d * p * p * c
    + depth * (6 * d * d + 4 * n * d * d + 2 * n * n * d + 8 * n * d * d)
  )
  assert common.train_flops_per_image(models.create_model(cfg)) == pytest.approx(
    6 * macs, rel=1e-12
  )
  # The usual 575 G per DiMSUM-L/2 training image (96 G MACs forward, x2, x3).
  dimsum = models.create_model(common.model_config("DiMSUM-L/2", 32))
  assert common.train_flops_per_image(dimsum) == pytest.approx(575e9, rel=0.01)
