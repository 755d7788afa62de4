"""The Pallas selective scan under a batch-sharded jit on 8 CPU devices (Pallas interpret mode).

`selective_scan(..., impl='pallas')` traced with a mesh in context runs the kernel per batch shard
(jax.shard_map). Checked in a subprocess with 8 fake devices: values, last state and all nine
gradients equal the unsharded kernel and the associative-scan reference, on a (2, 4) and a (1, 8)
mesh; the compiled program holds no all-gather (the kernel called without shard_map, on the same
inputs, does gather the [b, l, d] activations: the check can fail); two scans through
`selective_scan_many` run as one kernel call per shard; and which mesh axes are used.
"""

import json

from tests import train_util

_SCRIPT = r'''
import json, re, warnings
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dimsum_jax import sharding
from dimsum_jax.ops import selective_scan as ss, selective_scan_pallas as ssp
from tests.jaxprs import kernel_calls

assert jax.device_count() == 8  # the kernel interprets itself off a GPU
B_, L, D, N = 8, 6, 16, 4
SHARED = ("A", "D", "delta_bias")
results = {}


def inputs(seed, optional):
  ks = jax.random.split(jax.random.key(seed), 9)
  inp = dict(u=jax.random.normal(ks[0], (B_, L, D)),
             delta=0.5 * jax.random.normal(ks[1], (B_, L, D)),
             A=-jnp.exp(0.5 * jax.random.normal(ks[2], (D, N))),
             B=jax.random.normal(ks[3], (B_, L, N)), C=jax.random.normal(ks[4], (B_, L, N)))
  if optional:
    inp.update(D=jax.random.normal(ks[5], (D,)), z=jax.random.normal(ks[6], (B_, L, D)),
               delta_bias=0.3 * jax.random.normal(ks[7], (D,)),
               initial_state=jax.random.normal(ks[8], (B_, D, N)))
  return inp


def value_and_grad(fn, last_state):
  def loss(p):
    out = fn(p["u"], p["delta"], p["A"], p["B"], p["C"], p.get("D"), p.get("z"),
             p.get("delta_bias"), True, p.get("initial_state"), last_state)
    y, last = out if last_state else (out, jnp.zeros(()))
    return jnp.sum(jnp.sin(y) * y) + jnp.sum(last ** 2), (y, last)
  return jax.value_and_grad(loss, has_aux=True)


def gathers(text):
  return [list(map(int, s.split(","))) if s else []
          for s in re.findall(r"\w+\[([\d,]*)\]\{[^}]*\} all-gather\(", text)]


def rel_errors(a, b):
  return jax.tree.map(
      lambda x, y: float(jnp.linalg.norm(x - y) / max(float(jnp.linalg.norm(y)), 1e-30)), a, b)


def case(name, mesh_shape, seed, optional, last_state, reference_unsharded_kernel):
  inp = inputs(seed, optional)
  mesh = sharding.make_mesh(mesh_shape)
  placed = {k: jax.device_put(v, NamedSharding(mesh, P() if k in SHARED else
                                               P(sharding.BATCH_AXES))) for k, v in inp.items()}
  dispatch = lambda *a: ss.selective_scan(*a, impl="pallas")
  with jax.set_mesh(mesh):
    compiled = jax.jit(value_and_grad(dispatch, last_state)).lower(placed).compile()
  out = compiled(placed)
  ref = jax.jit(value_and_grad(ss.selective_scan_reference, last_state))(inp)
  res = {"vs_reference": rel_errors(out, ref), "gathers": gathers(compiled.as_text()),
         "y_batch_sharded": out[0][1][0].sharding.is_equivalent_to(
             NamedSharding(mesh, P(sharding.BATCH_AXES)), 3)}
  if reference_unsharded_kernel:
    # The same kernel and inputs without a mesh in context: XLA must gather the batch.
    plain = jax.jit(value_and_grad(ssp.selective_scan_pallas, last_state)).lower(placed).compile()
    res["vs_unsharded_kernel"] = rel_errors(out, plain(placed))
    res["unsharded_gathers"] = gathers(plain.as_text())
  results[name] = res


case("mesh_2x4_all_inputs", {"data": 2, "fsdp": 4}, 1, True, True, True)
case("mesh_1x8_required_only", {"data": 1, "fsdp": 8}, 2, False, False, False)

# Two scans through selective_scan_many: one row per device, so one kernel call per shard.
mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
pair = [inputs(3, True), inputs(4, True)]
placed = [{k: jax.device_put(v, NamedSharding(mesh, P() if k in SHARED else
                                             P(sharding.BATCH_AXES))) for k, v in inp.items()}
          for inp in pair]
many = lambda ps: ss.selective_scan_many([ss.ScanInputs(**p) for p in ps], True, impl="pallas")
with jax.set_mesh(mesh):
  calls = kernel_calls(many, placed)
  out = jax.jit(many)(placed)
ref = [ss.selective_scan_reference(**p, delta_softplus=True) for p in pair]
results["many"] = {"calls": calls, "vs_reference": rel_errors(out, ref)}

axes = {"no_mesh": list(ss.batch_shard_axes(8))}
with jax.set_mesh(sharding.make_mesh({"data": 2, "fsdp": 4})):
  axes["mesh_2x4"] = list(ss.batch_shard_axes(8))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    axes["batch_4_on_8"] = list(ss.batch_shard_axes(4))
  axes["warning"] = " ".join(str(w.message) for w in caught)
with jax.set_mesh(sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])):
  axes["one_device"] = list(ss.batch_shard_axes(8))
results["axes"] = axes
print("RESULT " + json.dumps(results))
'''


def _run():
  proc = train_util.run_python(["-c", _SCRIPT], devices=8, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
  return json.loads(lines[-1][len("RESULT ") :])


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  if isinstance(tree, list):
    out = {}
    for i, v in enumerate(tree):
      out.update(_flat(v, f"{prefix}{i}."))
    return out
  return {prefix[:-1]: tree}


def test_sharded_pallas_scan_on_8_devices():
  results = _run()
  names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
  for case, grads in (("mesh_2x4_all_inputs", names), ("mesh_1x8_required_only", names[:5])):
    res = results[case]
    # ((loss, (y, last)), grads): every output and every gradient, float32 relative errors.
    errors = _flat(res["vs_reference"])
    assert {f"1.{g}" for g in grads} <= set(errors), (case, sorted(errors))
    bad = {k: v for k, v in errors.items() if not v <= 5e-6}
    assert not bad, (case, bad)
    assert res["gathers"] == [], (case, res["gathers"])
    assert res["y_batch_sharded"], case

  res = results["mesh_2x4_all_inputs"]
  # Sharded and unsharded runs of the same kernel differ only by the order of the dA/dD/dbias sums.
  bad = {k: v for k, v in _flat(res["vs_unsharded_kernel"]).items() if not v <= 1e-6}
  assert not bad, bad
  # Without shard_map the batch of the activations (padded to 128 channels) is gathered.
  assert [8, 8, 128] in res["unsharded_gathers"], res["unsharded_gathers"]

  many = results["many"]
  assert many["calls"] == 1, many
  assert max(_flat(many["vs_reference"]).values()) <= 5e-6, many

  axes = results["axes"]
  assert axes["no_mesh"] == [] and axes["one_device"] == []
  assert axes["mesh_2x4"] == ["data", "fsdp"]
  assert axes["batch_4_on_8"] == [] and "multiple of 8" in axes["warning"]
