"""dimsum_jax.precast: which leaves are cast (hand-derived programs through every control-flow
primitive it follows), and that the three models give bit-identical outputs with cast weights,
also under an 8-device mesh with the sharded Pallas scan (a subprocess)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import jaxpr_params
from dimsum_jax import models
from dimsum_jax import precast
from tests import seeds, train_util
from tests.models.common import FAST, tiny_config

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
W = jnp.ones((3, 3), F32)
X = jnp.ones((2, 3), F32)


def read_as(fn, leaf=W, *args):
  """The dtype precast assigns to the one parameter of fn(p, *args)."""
  return precast.read_dtypes(fn, {"w": leaf}, *args)["w"]


def bf(p):
  return p["w"].astype(BF16)


# (name, fn(params, x), expected dtype of the leaf): each case derived by hand.
CASES = [
  ("only cast", lambda p, x: x.astype(BF16) @ bf(p), BF16),
  ("cast twice to one dtype", lambda p, x: x.astype(BF16) @ bf(p) + bf(p).sum(), BF16),
  ("also read as it is", lambda p, x: x @ p["w"] + bf(p).sum(), None),
  ("two narrower dtypes", lambda p, x: bf(p).sum() + p["w"].astype(F16).sum(), None),
  ("returned", lambda p, x: (bf(p), p["w"]), None),
  ("unread", lambda p, x: x, None),
  ("inside jit", lambda p, x: jax.jit(lambda w: w.astype(BF16) * 2)(p["w"]), BF16),
  ("inside checkpoint", lambda p, x: jax.checkpoint(lambda w: w.astype(BF16) * 2)(p["w"]), BF16),
  (
    "scan constant",
    lambda p, x: jax.lax.scan(lambda c, _: (c + bf(p).sum(), None), 0.0, None, length=2)[0],
    BF16,
  ),
  (
    "scan input, sliced per iteration",
    lambda p, x: jax.lax.scan(lambda c, w: (c + w.astype(BF16).sum(), None), 0.0, p["w"])[0],
    BF16,
  ),
  (
    "scan carry",
    lambda p, x: jax.lax.scan(lambda c, _: (c.astype(BF16).astype(F32), None), p["w"], None, 2)[0],
    None,
  ),
  (
    "cond branches",
    lambda p, x: jax.lax.cond(
      x[0, 0] > 0, lambda w: w.astype(BF16), lambda w: -w.astype(BF16), p["w"]
    ),
    BF16,
  ),
  (
    "cond branch reading it as it is",
    lambda p, x: jax.lax.cond(x[0, 0] > 0, lambda w: w, lambda w: -w, p["w"]),
    None,
  ),
  (
    "while body constant",
    lambda p, x: jax.lax.while_loop(
      lambda c: c < 3, lambda c: c + bf(p)[0, 0], jnp.zeros((), BF16)
    ),
    BF16,
  ),
  (
    "while carry",
    lambda p, x: jax.lax.while_loop(lambda c: c[0, 0] < 3, lambda c: c + 1, p["w"]),
    None,
  ),
  ("unknown primitive (vmap of a sort) reads it", lambda p, x: jnp.sort(p["w"]).astype(BF16), None),
]


@pytest.mark.parametrize("fn,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_leaves_cast_are_those_every_read_narrows(fn, expected):
  got = read_as(fn, W, X)
  assert (got is None and expected is None) or jnp.dtype(got) == jnp.dtype(expected), got


def test_no_float_leaf_is_cast_wider_and_integers_are_untouched():
  assert read_as(lambda p, x: p["w"].astype(F32).sum(), W.astype(BF16), X) is None
  assert read_as(lambda p, x: p["w"].astype(F32).sum(), jnp.ones((3,), jnp.int32), X) is None


def test_precast_params_casts_in_place_of_the_reads():
  params = {"w": jnp.arange(9.0, dtype=F32).reshape(3, 3) / 7, "b": jnp.ones((3,), F32)}
  fn = lambda p, x: x.astype(BF16) @ p["w"].astype(BF16) + p["b"]
  cast = precast.precast_params(fn, params, X)
  assert cast["w"].dtype == BF16 and cast["b"].dtype == F32
  np.testing.assert_array_equal(cast["w"], params["w"].astype(BF16))
  np.testing.assert_array_equal(fn(cast, X), fn(params, X))


def test_scan_operand_counts_read_this_jax_and_the_packed_layout():
  # Hand-derived: a scan closing over 2 arrays (constants), with 1 carry and 2 scanned inputs.
  def fn(a, b, c0, xs1, xs2):
    body = lambda c, x: (c + a.sum() + b.sum() + x[0].sum() + x[1].sum(), None)
    return jax.lax.scan(body, c0, (xs1, xs2))[0]

  v = jnp.ones((3,), F32)
  (eqn,) = [e for e in jax.make_jaxpr(fn)(v, v, 0.0, v, v).jaxpr.eqns if e.primitive.name == "scan"]
  assert jaxpr_params.scan_operand_counts(eqn.params) == (2, 1)

  class Packed:  # JAX 0.11's `ft_in`: the operands grouped as (constants, carries, inputs)
    def unpack(self):
      return (("a", "b"), ("c0",), ("xs1", "xs2"))

  assert jaxpr_params.scan_operand_counts({"ft_in": Packed(), "length": 3}) == (2, 1)
  assert jaxpr_params.scan_operand_counts({"jaxpr": None, "length": 3}) is None


def test_a_scan_of_unknown_layout_leaves_its_operands_uncast(monkeypatch):
  monkeypatch.setattr(jaxpr_params, "scan_operand_counts", lambda params: None)
  constant = CASES[[c[0] for c in CASES].index("scan constant")][1]
  assert read_as(constant, W, X) is None


MODELS = {
  "DiMSUM": dict(name="DiMSUM-L/2", dtype="bfloat16"),
  "DiMSUM-hoisted-adaLN": dict(name="DiMSUM-L/2", dtype="bfloat16", inference_hoist_adaln=True),
  "DiT": dict(name="DiT-S/2", hidden_size=48, depth=2, dtype="bfloat16"),
  "DiM": dict(name="DiM-L/2", hidden_size=32, depth=3, dtype="bfloat16"),
}


@pytest.mark.parametrize("family", sorted(MODELS))
@seeds.each(default=3)
def test_models_give_identical_outputs_with_the_weights_cast_once(family, seed):
  mc = tiny_config(**MODELS[family])
  model = models.create_model(mc)
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k[0], (2, mc.input_size, mc.input_size, mc.in_channels), F32)
  t = jax.random.uniform(k[1], (2,), F32)
  y = jax.random.randint(k[2], (2,), 0, mc.num_classes)
  params = jax.jit(model.init)(k[3], x, t, y)["params"]
  # Zero-initialised layers filled so that every weight reaches the output.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(k[3], 1), len(leaves))
  params = jax.tree.unflatten(
    treedef,
    [
      jnp.where(jnp.any(l != 0), l, 0.05 * jax.random.normal(kk, l.shape, l.dtype))
      for kk, l in zip(keys, leaves)
    ],
  )
  apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y), compiler_options=FAST)
  cast = precast.precast_model_params(model, params, x, y)
  dtypes = {
    jax.tree_util.keystr(path): leaf.dtype
    for path, leaf in jax.tree_util.tree_leaves_with_path(cast)
  }
  narrowed = [k for k, d in dtypes.items() if d == BF16]
  assert len(narrowed) >= len(dtypes) // 3, f"seed {seed}: only {narrowed} cast"
  # Read in float32 by the selective scan: never narrowed.
  assert all(dtypes[k] == F32 for k in dtypes if k.endswith(("['A_log']", "['D']"))), dtypes
  want, got = apply(params, x, t, y), apply(cast, x, t, y)
  assert bool(jnp.any(want != 0)), f"seed {seed}: the output is trivially zero"
  np.testing.assert_array_equal(np.asarray(got, F32), np.asarray(want, F32), err_msg=f"seed {seed}")


_MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, ml_collections
from dimsum_jax import models, precast, sharding
from tests.models.common import tiny_config

assert jax.device_count() == 8
mc = tiny_config(scan_impl="pallas", dtype="bfloat16")  # the kernel interprets itself on a CPU
model = models.create_model(mc)
k = jax.random.split(jax.random.PRNGKey(SEED), 4)
x = jax.random.normal(k[0], (8, 8, 8, mc.in_channels))
t = jax.random.uniform(k[1], (8,))
y = jax.random.randint(k[2], (8,), 0, mc.num_classes)
params = jax.jit(model.init)(k[3], x, t, y)["params"]
params = jax.tree.map(lambda l: l + 0.05 * jax.random.normal(k[3], l.shape), params)
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
f = lambda p, x, t, y: model.apply({"params": p}, x, t, y)
with jax.set_mesh(mesh):  # the Pallas scan runs per batch shard (shard_map), as in the sampler
  want = jax.jit(f)(params, x, t, y)
  got = jax.jit(lambda p, x, t, y: f(precast.precast_model_params(model, p, x, y), x, t, y))(
    params, x, t, y
  )
  dtypes = precast.read_dtypes(f, params, x, t, y)
cast = sum(d is not None for d in jax.tree.leaves(dtypes, is_leaf=lambda d: d is None))
print("RESULT", cast, bool(jnp.all(want == got)), bool(jnp.any(want != 0)))
"""


@seeds.each(default=0)
def test_weights_cast_once_under_a_mesh_with_the_sharded_pallas_scan(seed):
  """8 CPU devices: the precast trace sees the shard_map around the interpreted Pallas scan."""
  proc = train_util.run_python(
    ["-c", _MESH_SCRIPT.replace("SEED", str(seed))], devices=8, timeout=600
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
  cast, identical, nonzero = lines[-1].split()[1:]
  assert int(cast) > 0 and identical == "True" and nonzero == "True", f"seed {seed}: {lines[-1]}"
