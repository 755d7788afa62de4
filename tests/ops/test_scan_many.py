"""`selective_scan_many`: several independent scans, one Pallas call where a call each would leave
the GPU idle (DiMSUM's two branches at batch 1), with the results of one call each; and such a call's
rows run as time segments (`MAX_TIME_SEGMENTS`), with the results of whole rows.

The kernel runs in Pallas' generic interpreter on the CPU. Oracles: the same scans as separate
kernel calls (fusion off: `FUSE_MAX_PROGRAMS = 0`) and the sequential scan; the number of kernel
calls is read from the traced program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax.ops import selective_scan as ss
from tests.jaxprs import kernel_calls

SEED = 21


def _scan(seed, b=1, length=12, d=64, n=4):
  k = jax.random.split(jax.random.key(seed), 9)
  normal = lambda i, shape, scale=1.0: scale * jax.random.normal(k[i], shape)
  return ss.ScanInputs(
    u=normal(0, (b, length, d)),
    delta=normal(1, (b, length, d), 0.5),
    A=-jnp.exp(normal(2, (d, n), 0.5)),
    B=normal(3, (b, length, n)),
    C=normal(4, (b, length, n)),
    D=normal(5, (d,)),
    z=normal(6, (b, length, d)),
    delta_bias=normal(7, (d,), 0.3),
    initial_state=normal(8, (b, d, n)),
  )


def _run(scans, impl):
  """Outputs, last states and the gradients of a fixed projection of them for every input."""

  def loss(scans):
    outs = ss.selective_scan_many(scans, True, True, impl=impl)
    total = sum(
      jnp.sum(jnp.sin(y) * (i + 1)) + jnp.sum(last**2) for i, (y, last) in enumerate(outs)
    )
    return total, outs

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(scans)


def _kernel_calls(scans):
  return kernel_calls(lambda s: ss.selective_scan_many(s, True, impl="pallas"), scans)


def test_small_batches_fuse_into_one_call_with_the_same_results(monkeypatch):
  scans = [_scan(SEED), _scan(SEED + 1)]
  assert ss.fuse_pays(2, 1, 64)
  assert _kernel_calls(scans) == 1
  (_, fused), fused_grads = _run(scans, "pallas")
  monkeypatch.setattr(ss, "FUSE_MAX_PROGRAMS", 0)
  assert _kernel_calls(scans) == 2
  (_, apart), apart_grads = _run(scans, "pallas")
  (_, seq), seq_grads = _run(scans, "sequential")
  for got, want in ((fused, apart), (fused_grads, apart_grads)):
    jax.tree.map(np.testing.assert_array_equal, got, want)
  for got, want in ((fused, seq), (fused_grads, seq_grads)):
    err = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max()), got, want)
    assert max(jax.tree.leaves(err)) < 1e-5, f"seed {SEED}: {err}"


def test_large_or_unlike_scans_keep_a_call_each():
  # 2 scans x 64 rows x 2 channel blocks: 256 programs, over one wave.
  big = [_scan(SEED, b=64, d=256, length=4), _scan(SEED + 1, b=64, d=256, length=4)]
  assert not ss.fuse_pays(2, 64, 256)
  assert _kernel_calls(big) == 2
  unlike = [_scan(SEED), _scan(SEED + 1, length=10)]
  assert _kernel_calls(unlike) == 2
  (_, outs), _ = _run(unlike, "pallas")
  (_, seq), _ = _run(unlike, "sequential")
  for (y, last), (y_s, last_s) in zip(outs, seq):
    np.testing.assert_allclose(y, y_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, last_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "sequential"])
def test_other_implementations_scan_each(impl):
  scans = [_scan(SEED), _scan(SEED + 1)]
  outs = ss.selective_scan_many(scans, True, impl=impl)
  for scan, y in zip(scans, outs):
    one = ss.selective_scan(*scan[:8], True, scan.initial_state, impl=impl)
    np.testing.assert_array_equal(y, one)


def test_fuse_pays_counts_programs_of_one_wave():
  # DiMSUM-L/2's branches (1024 channels) at batch 1 and 8 fit one wave; training batches do not.
  assert ss.fuse_pays(2, 1, 1024) and ss.fuse_pays(2, 8, 1024)
  assert not ss.fuse_pays(2, 9, 1024) and not ss.fuse_pays(2, 128, 1024)


def test_short_calls_run_in_time_segments_with_the_same_results(monkeypatch):
  """Each row as 4 segments of 8 steps: two kernel calls (ends from zero, then every segment from
  its start) give the whole rows' outputs, last states and gradients, fused or not, with and
  without z, D, the bias, softplus and an initial state."""
  monkeypatch.setattr(ss, "MAX_TIME_SEGMENTS", 4)
  monkeypatch.setattr(ss, "MIN_SEGMENT", 8)
  full = [_scan(SEED, length=32), _scan(SEED + 1, length=32)]
  bare = [_scan(SEED + 2, b=2, length=32, d=160)._replace(z=None, D=None, delta_bias=None)]
  bare[0] = bare[0]._replace(delta=bare[0].delta ** 2, initial_state=None)
  assert ss.time_segments(2, 32, 4) == 4 and ss.time_segments(4, 32, 4) == 4
  for scans, softplus in ((full, True), (bare, False)):
    assert _kernel_calls(scans) == 2, softplus

    def loss(scans, impl, softplus=softplus):
      outs = ss.selective_scan_many(scans, softplus, True, impl=impl)
      total = sum(jnp.sum(jnp.sin(y)) + jnp.sum(last**2) for y, last in outs)
      return total, outs

    grads = lambda impl: jax.jit(jax.value_and_grad(lambda s: loss(s, impl), has_aux=True))(scans)
    (_, split), split_grads = grads("pallas")
    (_, seq), seq_grads = grads("sequential")
    err = jax.tree.map(
      lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max()),
      (split, split_grads),
      (seq, seq_grads),
    )
    assert max(jax.tree.leaves(err)) < 1e-5, f"seed {SEED}, softplus {softplus}: {err}"


def test_time_segments_fill_one_wave_with_whole_chunks(monkeypatch):
  assert ss.MAX_TIME_SEGMENTS == 1 and ss.time_segments(16, 256, 4) == 1  # off by default
  monkeypatch.setattr(ss, "MAX_TIME_SEGMENTS", 8)
  # DiMSUM-L/2's fused branches: 16 programs at batch 1, 32 guided (batch 2), 1024 in training.
  assert ss.time_segments(16, 256, 4) == 8
  assert ss.time_segments(32, 256, 4) == 4
  assert ss.time_segments(1024, 256, 4) == 1
  # Segments are whole chunks of at least MIN_SEGMENT (16) steps.
  assert ss.time_segments(16, 32, 4) == 2 and ss.time_segments(16, 24, 4) == 1
  assert ss.time_segments(16, 96, 16) == 2  # 96 = 2 x 48 chunks of 16, not 4 x 24
