"""The fast path is the default and computes what the reference settings compute.

Defaults (models.default_model_config): wavelet_impl=direct, remat=dots, attention_impl=auto; the
scan-order permutations differentiate through the gather of the inverse order (no scatter-add).
Each is compared here with its reference setting on CPU (cuDNN's side runs under
`pytest -m gpu -n 0`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import models
from dimsum_jax.models import dimsum
from dimsum_jax.models import layers
from dimsum_jax.ops import scan_orders

SEED = 11


def test_defaults_are_the_fast_settings():
  cfg = models.default_model_config()
  assert (cfg.wavelet_impl, cfg.remat, cfg.attention_impl) == ("direct", "dots", "auto")


def test_auto_attention_is_xla_off_gpu_and_equals_it():
  rng = np.random.default_rng(SEED)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 4, 8)), jnp.float32) for _ in range(3))
  assert not layers.cudnn_attention_supported(q)  # CPU, float32
  np.testing.assert_array_equal(layers.attention(q, k, v, "auto"), layers.attention(q, k, v, "xla"))
  # float64 by hand against a NumPy softmax.
  q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(8)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(
    layers.attention(q, k, v, "auto"),
    np.einsum("bhqk,bkhd->bqhd", p, v64),
    rtol=1e-5,
    atol=1e-6,
    err_msg=f"seed {SEED}",
  )


def test_cudnn_needs_a_gpu_and_says_what_to_set():
  q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="set model.attention_impl=auto or xla"):
    layers.attention(q, q, q, "cudnn")


@pytest.mark.parametrize("order", ["raster", "window", "zoo"])
def test_permutation_gradient_is_the_inverse_gather(order):
  h = w = 8
  perm = {
    "raster": scan_orders.raster_order(h, w, transpose=True, reverse=True),
    "window": scan_orders.window_order(h, w, 4, column_first=True),
    "zoo": scan_orders.jpeg_paths(h, w)[5],
  }[order]
  inverse = scan_orders.inverse_permutation(perm)
  rng = np.random.default_rng(SEED)
  x = jnp.asarray(rng.standard_normal((2, h * w, 3)), jnp.float32)
  weight = jnp.asarray(rng.standard_normal((2, h * w, 3)), jnp.float32)

  def ours(x):
    return jnp.sum(dimsum.permute_tokens(x, perm, inverse) * weight)

  def plain(x):
    return jnp.sum(x[:, perm] * weight)

  np.testing.assert_array_equal(dimsum.permute_tokens(x, perm, inverse), np.asarray(x)[:, perm])
  # d/dx sum(x[:, perm] * w) = w[:, inverse]: exact (a permutation moves values, adds nothing).
  np.testing.assert_array_equal(jax.grad(ours)(x), np.asarray(weight)[:, inverse])
  np.testing.assert_array_equal(jax.grad(ours)(x), jax.grad(plain)(x))
  hlo = jax.jit(jax.grad(ours)).lower(x).as_text()
  assert "scatter" not in hlo and "gather" in hlo


@pytest.mark.parametrize("mlp", ["GatedMLP", "MLP"])
def test_dots_mlp_keeps_the_mlp_hidden_layer_and_dots_recomputes_it(mlp, capsys):
  """remat='dots_mlp' saves each MLP's activated hidden layer [tokens, hidden] for the backward
  (no recomputation of GELU(a) * b); 'dots' saves only the matmul outputs. Values and gradients
  equal remat='none' (tests/models/test_dimsum.py::test_remat_changes_memory_not_values)."""
  rng = np.random.default_rng(SEED)
  x = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
  module = getattr(layers, mlp)(hidden=24)
  params = module.init(jax.random.PRNGKey(SEED), x)

  def named_saves(remat):
    cls = layers.rematerialised(getattr(layers, mlp), remat)
    f = lambda p, x: jnp.sum(cls(hidden=24).apply(p, x) ** 2)
    jax.ad_checkpoint.print_saved_residuals(f, params, x)
    lines = capsys.readouterr().out.splitlines()
    return [line for line in lines if f"named '{layers.MLP_HIDDEN}'" in line]

  assert named_saves("dots") == []
  kept = named_saves("dots_mlp")
  assert len(kept) == 1 and "[2,8,24]" in kept[0], kept
