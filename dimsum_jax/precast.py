"""Parameters cast once to the dtype the model reads them in, for sampling loops.

A model with bf16 compute and float32 parameters casts each weight to bf16 where it uses it. In
a sampler that is once per model evaluation, and inside a scan over stacked blocks XLA cannot hoist
the cast out of the solver's loop (it follows the per-iteration slice). In a batch-1 DiMSUM-L/2
evaluation on an H100 those casts take about 1.0 of its 5.9 ms of kernel time.

`precast_params(apply_fn, params, *args)` (`precast_model_params` for a model of this package)
traces apply_fn(params, *args) once and casts exactly the float leaves that every read converts
to one narrower dtype (Dense kernels and biases, embedding tables); a leaf read in float32
anywhere (a Mamba block's A_log, D and dt bias, a norm's scale) is left as it is. Every cast leaf
reaches the same operations with the same value as before, so the model's output is bit-identical.

Shapes: params is any pytree of arrays; the result has the same structure and shapes, some leaves
in the narrower dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dimsum_jax import jaxpr_params

# Call-like primitives whose operand i is the sub-jaxpr's input i (their parameter naming it).
_CALLS = {
  'jit': 'jaxpr',
  'pjit': 'jaxpr',
  'closed_call': 'call_jaxpr',
  'core_call': 'call_jaxpr',
  'checkpoint': 'jaxpr',
  'remat': 'jaxpr',
  'remat2': 'jaxpr',
  'custom_jvp_call': 'call_jaxpr',
  'custom_vjp_call': 'call_jaxpr',
  'custom_vjp_call_jaxpr': 'fun_jaxpr',
}


def _open(jaxpr):
  return getattr(jaxpr, 'jaxpr', jaxpr)  # ClosedJaxpr -> Jaxpr


def _inner_reads(eqn, i):
  """[(jaxpr, var)]: where the sub-jaxprs of eqn read its operand i, or None when that operand
  is not passed through unchanged (a loop carry, a predicate, an unknown primitive)."""
  name, p = eqn.primitive.name, eqn.params
  if name in _CALLS and p.get(_CALLS[name]) is not None:
    j = _open(p[_CALLS[name]])
    return [(j, j.invars[i])]
  if name == 'scan':  # constants and sliced inputs; a carry changes between iterations
    counts = jaxpr_params.scan_operand_counts(p)
    if counts is None or counts[0] <= i < sum(counts):
      return None
    j = _open(p['jaxpr'])
    return [(j, j.invars[i])]
  if name == 'cond' and i > 0:
    return [(_open(b), _open(b).invars[i - 1]) for b in p['branches']]
  if name == 'while':
    cn, bn = p['cond_nconsts'], p['body_nconsts']
    if i < cn:
      j = _open(p['cond_jaxpr'])
      return [(j, j.invars[i])]
    if i < cn + bn:
      j = _open(p['body_jaxpr'])
      return [(j, j.invars[i - cn])]
  return None


def _uses(jaxpr):
  """{var: [(eqn, operand index)]} of a jaxpr."""
  uses = {}
  for eqn in jaxpr.eqns:
    for i, v in enumerate(eqn.invars):
      if not hasattr(v, 'val'):  # a Var, not a Literal
        uses.setdefault(v, []).append((eqn, i))
  return uses


def _read_as(jaxpr, var, uses_of):
  """The set of dtypes that every read of var converts it to (empty when unread), or None when
  some read uses it as it is. uses_of(jaxpr): _uses(jaxpr), memoised by the caller."""
  if any(v is var for v in jaxpr.outvars):
    return None
  dtypes = set()
  for eqn, i in uses_of(jaxpr).get(var, ()):
    if eqn.primitive.name == 'convert_element_type':
      dtypes.add(jnp.dtype(eqn.params['new_dtype']))
      continue
    inner = _inner_reads(eqn, i)
    if inner is None:
      return None
    for j, w in inner:
      d = _read_as(j, w, uses_of)
      if d is None:
        return None
      dtypes |= d
  return dtypes


def _leaf_dtypes(apply_fn, params, *args):
  """For each leaf of params (flattened), the narrower float dtype that apply_fn(params, *args)
  always reads it in, else None."""
  abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  closed = jax.make_jaxpr(apply_fn)(*jax.tree.map(abstract, (params, *args)))
  uses_of = functools.cache(_uses)  # this trace's jaxprs only
  leaves = jax.tree.leaves(params)
  out = []
  for leaf, var in zip(leaves, closed.jaxpr.invars[: len(leaves)]):
    dtype = jnp.dtype(leaf.dtype)
    read = _read_as(closed.jaxpr, var, uses_of) if jnp.issubdtype(dtype, jnp.floating) else None
    (to,) = read if read and len(read) == 1 else (None,)
    narrower = to is not None and jnp.issubdtype(to, jnp.floating) and to.itemsize < dtype.itemsize
    out.append(to if narrower else None)
  return out


def read_dtypes(apply_fn, params, *args):
  """Pytree like params: for each float leaf the narrower dtype that apply_fn(params, *args)
  always reads it in, else None."""
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, _leaf_dtypes(apply_fn, params, *args))


def precast_params(apply_fn, params, *args):
  """params with each float leaf that apply_fn(params, *args) only reads through one cast to a
  narrower dtype stored in that dtype (see the module docstring); jit-able."""
  dtypes = _leaf_dtypes(apply_fn, params, *args)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(
    treedef, [l if d is None else l.astype(d) for l, d in zip(leaves, dtypes)]
  )


def precast_model_params(model, params, x, y=None):
  """precast_params for `model.apply({'params': params}, x, t, y)`, the signature of this
  repository's models; x: a batch of inputs [B, H, W, C] (an array or ShapeDtypeStruct), y: its
  labels [B] or None."""
  apply = lambda p, x, t, y: model.apply({'params': p}, x, t, y)
  t = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
  return precast_params(apply, params, x, t, y)
