"""Tests of dimsum_jax.tools.flops: parameter counts, hand-counted XLA flops, unrolled scans."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import models
from dimsum_jax.tools import flops
from tests.golden import manifest
from tests import seeds
from tests.models import common


# A small DiMSUM where matmuls dominate: D = 512, 4x4 tokens, one group of 4 blocks.
SMALL = dict(name="DiMSUM-L/2", hidden_size=512, depth=4, input_size=8, num_classes=10)
# Tiny: one DiMSUM block per scanned group (attn_every 1), so that compiles stay short.
TINY = dict(name="DiMSUM-L/2", hidden_size=64, input_size=8, num_classes=10, attn_every=1)


def _cfg(**kw):
  return flops.model_config(None, **kw)


def _forward_and_args(cfg):
  model = models.create_model(cfg)
  inputs = flops.example_inputs(cfg)
  variables = flops.abstract_params(model, inputs)
  return model, (lambda v, x, t, y: model.apply(v, x, t, y)), (variables, *inputs)


def _hand_count_small_dimsum(D=512, N=16, depth=4):
  """Multiply-accumulates of every matmul of SMALL, written out: d = D/2, Mamba d_inner E = D,
  dt_rank d/16, d_state 16, MLP hidden 4D; one shared-attention application."""
  d, E, n, H = D // 2, D, 16, 4 * D
  r = d // 16
  mixer = N * d * 2 * E + N * E * (r + 2 * n) + N * r * E + N * E * d  # in, x, dt, out proj
  block = (
    2 * mixer
    + 2 * D * 3 * d  # two mixers, two branch adaLNs
    + 2 * N * d * 3 * d
    + 2 * 2 * N * N * d
    + N * D * D  # fusion qkv, attention, proj
    + D * 3 * D
    + N * D * 2 * H
    + N * H * D
  )  # block adaLN, gated MLP
  shared = D * 6 * D + N * D * 3 * D + 2 * N * N * D + N * D * D + N * D * 2 * H + N * H * D
  top = N * 4 * 2 * 2 * D + 256 * D + D * D + D * 2 * D + N * D * 2 * 2 * 4
  return depth * block + shared + top


# ---------------------------------------------------------------- parameters


def _tiny_inputs(cfg, seed):
  """Random inputs (x, t) of the tiny model from `seed`, and the label 3."""
  rng = np.random.default_rng(seed)
  x, t = (jnp.asarray(rng.uniform(size=s.shape), s.dtype) for s in flops.example_inputs(cfg)[:2])
  return x, t, jnp.asarray([3], jnp.int32)


@pytest.fixture(scope="module")
def tiny():
  """A tiny depth-3 model, non-zero weights (no init compile) and its jitted forward, rolled and
  with the scans unrolled (each compiled once for all seeds)."""
  cfg = _cfg(depth=3, **TINY)
  model = models.create_model(cfg)
  variables = {"params": common.filled_params(model, cfg)}
  forward = lambda v, x, t, y: model.apply(v, x, t, y)
  jitted = {
    "rolled": jax.jit(forward, compiler_options=flops.FAST_COMPILE),
    "unrolled": jax.jit(flops.unroll_scans(forward), compiler_options=flops.FAST_COMPILE),
  }
  return cfg, model, variables, jitted


# ---------------------------------------------------------------- hand-counted small cases

S = jax.ShapeDtypeStruct
F32 = jnp.float32


def test_xla_counts_linear_and_attention_exactly():
  """What XLA's count means, on cases small enough to count by hand: a matmul [m, k] @ [k, n]
  is 2 m k n flops (a multiply-accumulate is 2), a bias add m n more; attention
  softmax(q k^T) v over N tokens of width d written with exp / sum / divide is 4 N^2 d for the
  two products plus N^2 for the row sums and N^2 for the divisions (exp is a transcendental,
  which XLA reports separately)."""
  m, k, n = 3, 5, 7
  assert flops.xla_flops(lambda x, w: x @ w, S((m, k), F32), S((k, n), F32)) == 2 * m * k * n
  dense = lambda x, w, b: x @ w + b
  assert flops.xla_flops(dense, S((m, k), F32), S((k, n), F32), S((n,), F32)) == (
    2 * m * k * n + m * n
  )

  def attention(q, k, v):
    e = jnp.exp(q @ k.T)
    return (e / e.sum(-1, keepdims=True)) @ v

  N, d = 6, 4
  qkv = [S((N, d), F32)] * 3
  assert flops.xla_flops(attention, *qkv) == 4 * N * N * d + 2 * N * N


def test_scan_bodies_count_once_unless_unrolled():
  """A lax.scan of 4 matmuls [3, 5] @ [5, 5]: XLA's plain count holds one body (plus a couple of
  flops of loop bookkeeping); the tool's unrolled count is exactly 4 bodies."""

  def loop(h, ws):
    return jax.lax.scan(lambda h, w: (h @ w, None), h, ws)[0]

  args = (S((3, 5), F32), S((4, 5, 5), F32))
  body = 2 * 3 * 5 * 5
  assert flops.loops(loop, *args) == {"scan": [4], "while": []}
  assert flops.xla_flops(loop, *args) == 4 * body
  assert body <= flops.xla_flops(loop, *args, unroll=False) < 1.1 * body


def test_unrolling_a_scan_of_unknown_layout_is_one_sentence(monkeypatch):
  monkeypatch.setattr(flops.jaxpr_params, "scan_operand_counts", lambda params: None)
  loop = lambda h, ws: jax.lax.scan(lambda h, w: (h @ w, None), h, ws)[0]
  with pytest.raises(RuntimeError, match=r"cannot read: count with unroll=False or use JAX"):
    flops.unroll_scans(loop)(jnp.ones((3, 5)), jnp.ones((4, 5, 5)))


def test_param_count_is_sum_of_leaves(tiny):
  cfg, model, variables, _ = tiny
  leaves = jax.tree_util.tree_leaves(variables["params"])
  total, per = flops.param_counts(flops.abstract_params(model, flops.example_inputs(cfg)))
  assert total == sum(leaf.size for leaf in leaves)
  assert total == sum(per.values())
  assert set(per) == set(variables["params"])


@pytest.mark.parametrize(
  "name,key",
  [
    ("DiMSUM-B/2", "DiM-B/2 ImageNet-256 (1000 classes + null row)"),
    ("DiMSUM-L/2", "DiM-L/2 ImageNet-256 (1000 classes + null row)"),
  ],
)
def test_param_counts_match_upstream_manifest(name, key):
  """Per top-level module, against upstream's counts without the dead cond_proj layers."""
  upstream = manifest()["l2"]["param_counts"][key]
  cfg = _cfg(name=name, input_size=32, num_classes=1000)
  model = models.create_model(cfg)
  total, per = flops.param_counts(flops.abstract_params(model, flops.example_inputs(cfg)))
  assert total == upstream["total_without_cond_proj"]
  top = dict(upstream["top_level"])
  top["groups"] = top.pop("blocks") - upstream["cond_proj_total"]
  assert per == top


# ---------------------------------------------------------------- XLA counts


def test_xla_count_matches_hand_count_of_matmuls():
  _, forward, args = _forward_and_args(_cfg(**SMALL))
  macs = flops.xla_flops(forward, *args) / 2
  hand = _hand_count_small_dimsum()
  # XLA also counts norms, activations, softmax and the scan's elementwise work: a few percent.
  assert hand <= macs <= 1.05 * hand, (macs, hand)
  assert flops.port_macs(flops.dimsum_components(models.create_model(_cfg(**SMALL)))) == (
    hand + 4 * 2 * (16 * 512 * 4 + 3 * 16 * 512 * 16)
  )  # + conv1d and scan terms


def test_xla_count_matches_hand_count_dit():
  cfg = _cfg(name="DiT-S/2", hidden_size=384, depth=2, input_size=8, num_classes=10)
  _, forward, args = _forward_and_args(cfg)
  D, N, H = 384, 16, 1536
  block = D * 6 * D + N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * H
  hand = 2 * block + N * 16 * D + 256 * D + D * D + D * 2 * D + N * D * 16
  macs = flops.xla_flops(forward, *args) / 2
  assert hand <= macs <= 1.03 * hand, (macs, hand)
  assert flops.port_macs(flops.dit_components(models.create_model(cfg))) == hand


def test_unrolled_count_grows_with_every_group():
  """nn.scan bodies count once in XLA's analysis; the unrolled count is affine in the depth."""
  counts = []
  for depth in (1, 2, 3):
    _, forward, args = _forward_and_args(_cfg(depth=depth, **TINY))
    assert flops.loops(forward, *args) == {"scan": [depth], "while": []}
    counts.append(flops.xla_flops(forward, *args))
  group = counts[1] - counts[0]
  assert group > 0.3 * counts[0]
  np.testing.assert_allclose(counts[2] - counts[1], group, rtol=1e-3)
  # As compiled, XLA (today) counts the 3-trip loop body once.
  assert flops.xla_flops(forward, *args, unroll=False) <= 1.001 * counts[2]


@seeds.each()
def test_unrolled_forward_computes_the_same_output(tiny, seed):
  cfg, _, variables, jitted = tiny
  inputs = _tiny_inputs(cfg, seed)
  with jax.default_matmul_precision("highest"):  # a GPU's float32 default is TF32
    out = jitted["rolled"](variables, *inputs)
    unrolled = jitted["unrolled"](variables, *inputs)
  assert float(jnp.abs(out).max()) > 1e-2, f"seed {seed}"
  np.testing.assert_allclose(
    unrolled,
    out,
    rtol=1e-5,
    atol=1e-5 * float(jnp.abs(out).max()),
    err_msg=f"seed {seed}",
  )


# ---------------------------------------------------------------- published numbers


@pytest.mark.parametrize("input_size,published", [(32, 84.49), (64, 337.48)])
def test_paper_convention_reproduces_published_gflops(input_size, published):
  model = models.create_model(_cfg(name="DiMSUM-L/2", input_size=input_size, num_classes=0))
  components = flops.dimsum_components(model)
  assert round(flops.paper_macs(components) / 1e9, 2) == published
  # The reference's hand estimate: about 4.9 G per block, 4.4 G per shared-attention
  # application, about 96 G in all (256 px).
  if input_size == 32:
    block = (
      sum(
        v
        for k, v in components.items()
        if k.split(".")[0] in ("mamba", "branch", "fusion", "block")
      )
      / 16
    )
    shared = (
      sum(v for k, v in components.items() if k.startswith("shared.") and not k.endswith("*")) / 4
    )
    assert round(block / 1e9, 1) == 4.9 and round(shared / 1e9, 1) == 4.4
    assert round(flops.port_macs(components) / 1e9) == 96


def test_dit_l2_matches_dit_paper():
  """DiT-L/2 at 256 px: 80.7 Gflops (multiply-accumulates) in the DiT paper."""
  model = models.create_model(_cfg(name="DiT-L/2", input_size=32))
  assert round(flops.port_macs(flops.dit_components(model)) / 1e9, 1) == 80.7


def test_report_prints(capsys):
  result = flops.report(_cfg(depth=1, **TINY))
  text = capsys.readouterr().out
  assert "parameters:" in text and "scans unrolled" in text and "paper convention" in text
  assert result["params"] == sum(result["params_per_module"].values())


# ---------------------------------------------------------------- DiM

# DiM at DiM-L/2's width (the split skip form), 4x4 tokens: a sequence of L = 2 + 3 + 7 x 7.
DIM_SMALL = dict(name="DiM-L/2", hidden_size=1024, input_size=8, num_classes=10)


def _hand_count_small_dim(depth, D=1024, h=4, w=4):
  """Multiply-accumulates of every matmul and convolution of DIM_SMALL, written out: each
  block's Mamba (d_inner E = 2D, dt_rank D/16, d_state 16) over the whole padded sequence, one
  skip Linear (2D -> D) per consumer, and the layers outside the blocks (patch conv, time MLP,
  adaLN-single, the two depthwise 3x3 smoothers, proj_out_1 and proj_out_2)."""
  L, N, E, n = 2 + 3 + (h + 3) * (w + 3), h * w, 2 * D, 16
  r = D // 16
  mixer = L * D * 2 * E + L * E * (r + 2 * n) + L * r * E + L * E * D
  top = (
    N * 4 * 2 * 2 * D + 256 * D + D * D + D * 3 * D + 2 * N * D * 9 + D * 2 * D + N * D * 2 * 2 * 4
  )
  return depth * mixer + (depth - 1) // 2 * L * 2 * D * D + top


def _dim_scan_terms(depth, D=1024, L=54):
  """The causal conv1d (3 taps) and the selective scan (3 products per state) of every block."""
  return depth * (L * 2 * D * 3 + 3 * L * 2 * D * 16)


def test_xla_count_matches_hand_count_dim(capsys):
  """XLA's unrolled count of DiM against the hand count, at depths 3 and 5; the difference
  (two blocks and one skip Linear) too. XLA adds the elementwise work (norms, SiLU, softplus,
  the associative scan's combines): under 6 %."""
  result = flops.report(_cfg(depth=3, **DIM_SMALL))
  text = capsys.readouterr().out
  assert "mamba.in_proj" in text and "skip_linear" in text and "paper convention" not in text
  counts = {3: result["xla_flops"] / 2}
  _, forward, args = _forward_and_args(_cfg(depth=5, **DIM_SMALL))
  assert flops.loops(forward, *args) == {"scan": [2, 2], "while": []}
  counts[5] = flops.xla_flops(forward, *args) / 2
  # As compiled, each 2-trip scan body counts once: one block of each scan is missing.
  assert flops.xla_flops(forward, *args, unroll=False) < 0.8 * 2 * counts[5]
  for depth, macs in counts.items():
    hand = _hand_count_small_dim(depth) + _dim_scan_terms(depth)
    model = models.create_model(_cfg(depth=depth, **DIM_SMALL))
    assert flops.port_macs(flops.dim_components(model)) == hand
    assert hand <= macs <= 1.06 * hand, (depth, macs, hand)
  two = _hand_count_small_dim(5) - _hand_count_small_dim(3) + _dim_scan_terms(2)
  assert two <= counts[5] - counts[3] <= 1.06 * two


@pytest.mark.parametrize(
  "name,input_size,params,gmacs",
  [
    ("DiM-L/2", 32, 386_063_376, 139.0),
    ("DiM-H/2", 32, 862_407_184, 310.5),
    ("DiM-H/2", 64, 863_586_832, 1043.5),
  ],
)
def test_dim_published_sizes(name, input_size, params, gmacs):
  """The README's DiM rows: parameters (jax.eval_shape; the official counts) and the analytic
  multiply-accumulates per image."""
  cfg = _cfg(
    name=name,
    input_size=input_size,
    num_classes=1000,
    dim_padding="rho_pad" if input_size == 64 else "lateral",
  )
  model = models.create_model(cfg)
  total, _ = flops.param_counts(flops.abstract_params(model, flops.example_inputs(cfg)))
  assert total == params
  assert round(flops.port_macs(flops.dim_components(model)) / 1e9, 1) == gmacs
