"""Parameters and forward FLOPs per image of a model: XLA's count, a hand count, the paper's count.

  python -m dimsum_jax.tools.flops --config=configs/imagenet256.py [--config.model.name=DiT-L/2]
  python -m dimsum_jax.tools.flops --model=DiMSUM-L/2 --input_size=32 --num_classes=1000
  python -m dimsum_jax.tools.flops --model=DiM-L/2      # DiM (Teng et al.): --model=DiM-H/2

Without --config the model section is `dimsum_jax.models.default_model_config()`; --model,
--input_size, --num_classes, --depth and --hidden_size override it (with or without --config).

Printed:
  * parameters: total and per top-level module (jax.eval_shape, nothing is allocated);
  * XLA: `jax.jit(forward).lower(...).compile().cost_analysis()['flops']` at batch 1, float32,
    compiled for the CPU on every machine, and multiply-accumulates = flops / 2;
  * analytic multiply-accumulates by component (matmuls, attention scores, selective scan;
    `dimsum_components`, `dit_components`, `dim_components`);
  * for DiMSUM, the count in the paper's convention (see below).

XLA and loops. HLO cost analysis counts the body of a while loop once, whatever its trip count.
The DiMSUM stack is an `nn.scan` over groups of `attn_every` blocks (DiT: over blocks; DiM: two
scans, the skip producers and the consumers), so the
plain count holds one group only (tiny models of depth 8 and 16 get the same count; for
DiMSUM-L/2 at 256 px it reports 49.6 G instead of 198.2 G, for DiT-L/2 6.8 G instead of
161.9 G). This tool therefore counts an unrolled copy: the forward is traced to a jaxpr, and
every `scan` in it is replaced by its body applied `length` times (a small jaxpr interpreter,
`unroll_scans`) before jit/lower/compile. The selective scan itself is a
`jax.lax.associative_scan` (straight-line code, no loop) and is counted as written. The rolled
count is printed too (`--rolled` only prints it). A `while` loop left in the jaxpr (none in these
models) would still be counted once; the tool warns if it finds one.

The paper's convention. The paper's 84.49 (256 px) and 337.48 (512 px) "GFLOPs" of DiMSUM-L/2
come from upstream eval_toolbox (calflops, printing flops / 2). calflops patches `F.linear`,
`F.conv*`, `F.silu`, `F.gelu`, `F.layer_norm`, `F.softmax` and `torch.matmul`-style calls; it
does not see the `@` operator, `F.scaled_dot_product_attention`, Triton or CUDA kernels. So it
counts, as multiply-accumulates: every nn.Linear and the `F.linear` calls inside mamba_inner_fn
(x_proj, out_proj), the dead `cond_proj` layers, the patch-embedding conv (+ half its bias adds),
and half of each counted elementwise op (SiLU on c, GELU, affine-free LayerNorm at 4 flops per
element, the Haar analysis convs; the synthesis conv_transpose counts 0 there). It leaves out
in_proj and dt_proj (written `W @ x`), the causal conv1d and the selective scan (CUDA), both
attentions' score and value products (SDPA), and the RMSNorms (Triton). With the shared
attention block's linears included, this reproduces 84.49 G and 337.48 G to 0.01 G; without
them it gives 67.28 G (256 px), so the published numbers were measured with
`--use-attn-every-k-layers 4` (upstream's run_flop.sh has had that flag both set and commented out).
"""

from __future__ import annotations

import math
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from dimsum_jax import command_line
from dimsum_jax import jaxpr_params
from dimsum_jax import models
from dimsum_jax.models import dim
from dimsum_jax.models.dimsum import DiMSUM
from dimsum_jax.models.mamba import MambaMixer

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
  'config',
  None,
  'Config file (configs/*.py) with a model section.',
  flag_values=FLAGS,
  lock_config=True,
)
flags.DEFINE_string(
  'model', None, 'Model name, e.g. DiMSUM-L/2 or DiT-L/2 (overrides config).', flag_values=FLAGS
)
flags.DEFINE_integer(
  'input_size', None, 'Latent size (image size / 8) (overrides config).', flag_values=FLAGS
)
flags.DEFINE_integer(
  'num_classes', None, 'Classes; 0 = unconditional (overrides config).', flag_values=FLAGS
)
flags.DEFINE_integer('depth', None, 'Depth override (smaller test models).', flag_values=FLAGS)
flags.DEFINE_integer(
  'hidden_size', None, 'Hidden size override (smaller test models).', flag_values=FLAGS
)
flags.DEFINE_bool(
  'rolled', False, 'Only the plain XLA count (scan bodies counted once).', flag_values=FLAGS
)

PAPER_GMACS = {('DiMSUM-L/2', 32): 84.49, ('DiMSUM-L/2', 64): 337.48}


# ---------------------------------------------------------------- model and parameters


def model_config(config=None, **overrides) -> ml_collections.ConfigDict:
  """The model section: defaults, then the config file's, then non-None overrides."""
  cfg = models.default_model_config()
  if config is not None:
    cfg.update(dict(config.model if 'model' in config else config))
  for key, value in overrides.items():
    if value is not None:
      cfg[key] = value
  if 'scan_impl' in models.fields_read(cfg.name):
    cfg.scan_impl = 'reference'  # the Pallas kernel is opaque to cost analysis
  cfg.dtype = 'float32'
  return cfg


def example_inputs(cfg, batch: int = 1):
  size = cfg.input_size
  return (
    jax.ShapeDtypeStruct((batch, size, size, cfg.in_channels), jnp.float32),
    jax.ShapeDtypeStruct((batch,), jnp.float32),
    jax.ShapeDtypeStruct((batch,), jnp.int32),
  )


def abstract_params(model, inputs):
  """{'params': models.abstract_params} of `model` for its `example_inputs` (x gives the size)."""
  _, size, _, channels = inputs[0].shape
  shape = ml_collections.ConfigDict(
    dict(input_size=size, in_channels=channels, num_classes=model.num_classes)
  )
  return {'params': models.abstract_params(model, shape)}


def param_counts(variables) -> tuple[int, dict[str, int]]:
  """(total, {top-level module: count}) over the 'params' collection."""
  params = variables['params']
  per = {
    name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(sub))
    for name, sub in params.items()
  }
  return sum(per.values()), per


# ---------------------------------------------------------------- XLA cost analysis


def _is_closed(value) -> bool:
  return isinstance(value, jax.extend.core.ClosedJaxpr)


def _eval_unrolled(jaxpr, consts, args):
  """Evaluate a jaxpr, inlining calls and unrolling every `scan` into straight-line code."""
  prims = jax.extend.core.primitives
  env = {}

  def read(v):
    return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    prim, params = eqn.primitive, eqn.params
    if prim is prims.scan_p:
      outs = _scan_unrolled(params, invals)
    elif prim in (
      prims.jit_p,
      prims.closed_call_p,
      prims.custom_jvp_call_p,
      prims.custom_vjp_call_p,
      prims.remat_p,
    ):
      inner = next(v for k, v in params.items() if k in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'))
      outs = (
        _eval_unrolled(inner.jaxpr, inner.consts, invals)
        if _is_closed(inner)
        else _eval_unrolled(inner, (), invals)
      )
    else:
      bind_params = prim.get_bind_params(params)
      subfuns = ()
      if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
      outs = prim.bind(*subfuns, *invals, **bind_params)
      if not prim.multiple_results:
        outs = [outs]
    for var, value in zip(eqn.outvars, outs):
      if not isinstance(var, jax.extend.core.DropVar):
        env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _scan_unrolled(params, invals):
  body, length = params['jaxpr'], params['length']
  counts = jaxpr_params.scan_operand_counts(params)
  if counts is None:
    raise RuntimeError(
      f'This JAX ({jax.__version__}) names its scan parameters {sorted(params)}, which the '
      'unrolled flop count cannot read: count with unroll=False or use JAX 0.10 or 0.11.'
    )
  n_consts, n_carry = counts
  consts, carry = invals[:n_consts], invals[n_consts : n_consts + n_carry]
  xs = invals[n_consts + n_carry :]
  ys = [None] * length
  steps = reversed(range(length)) if params['reverse'] else range(length)
  for i in steps:
    out = _eval_unrolled(body.jaxpr, body.consts, [*consts, *carry, *(x[i] for x in xs)])
    carry, ys[i] = out[:n_carry], out[n_carry:]
  n_ys = len(body.jaxpr.outvars) - n_carry
  stacked = [jnp.stack([y[k] for y in ys]) for k in range(n_ys)]
  return [*carry, *stacked]


def unroll_scans(fn):
  """fn with every lax.scan (nn.scan included) unrolled; same outputs, straight-line HLO."""

  def unrolled(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out = _eval_unrolled(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

  return unrolled


def loops(fn, *args) -> dict[str, list[int]]:
  """Loops in fn's jaxpr: {'scan': [trip counts], 'while': [-1 per loop]}."""
  found = {'scan': [], 'while': []}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive is jax.extend.core.primitives.scan_p:
        found['scan'].append(eqn.params['length'])
      elif eqn.primitive is jax.extend.core.primitives.while_p:
        found['while'].append(-1)
      for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
          if _is_closed(v):
            walk(v.jaxpr)
          elif isinstance(v, jax.extend.core.Jaxpr):
            walk(v)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


# LLVM optimisation does not change HLO cost analysis (checked: identical counts for the
# models here, rolled and unrolled) but doubles CPU compile time.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def xla_flops(fn, *args, unroll: bool = True, fast_compile: bool = True) -> float:
  """XLA's flop count of jit(fn) on abstract args; scans unrolled unless unroll=False.

  Always compiled for the CPU: a GPU compiler fuses and rewrites differently (cuBLAS calls, bias
  adds folded into epilogues), so its count would depend on the machine that counted."""
  target = unroll_scans(fn) if unroll else fn
  options = FAST_COMPILE if fast_compile else None
  cpu = jax.devices('cpu')[0]
  on_cpu = jax.sharding.SingleDeviceSharding(cpu)
  args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=on_cpu), args)
  with jax.default_device(cpu):
    lowered = jax.jit(target, compiler_options=options).lower(*args)
  analysis = lowered.compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
    analysis = analysis[0]
  return float(analysis['flops'])


# ---------------------------------------------------------------- analytic counts


def dimsum_components(model: DiMSUM) -> dict[str, float]:
  """Multiply-accumulates per image by component (forward, batch 1), written out by hand.

  Keys ending in '*' are not in this port's forward: 'cond_proj*' exists upstream only (dead
  layers: upstream's `causal_conv1d_fwd_cond` overwrites the condition it is given); with cond_mamba='h0' the port has it too.
  """
  D, depth, p = model.hidden_size, model.depth, model.patch_size
  g = model.input_size // p
  N = g * g
  d = D // 2
  E = MambaMixer.expand * d
  n, k = MambaMixer.d_state, MambaMixer.d_conv
  r = math.ceil(d / 16)
  groups = depth // model.attn_every if model.attn_every else 0
  mlp = N * (D * 2 * model.mlp_ratio * D + model.mlp_ratio * D * D)
  c = {
    'x_embedder': N * model.in_channels * p * p * D,
    't_embedder': 256 * D + D * D,
    'final_layer': D * 2 * D + N * D * p * p * model.in_channels,
    # per DiMSUM block, times depth; two Mamba mixers (spatial, wavelet) of width d
    'mamba.in_proj': depth * 2 * N * d * 2 * E,
    'mamba.conv1d': depth * 2 * N * E * k,
    'mamba.x_proj': depth * 2 * N * E * (r + 2 * n),
    'mamba.dt_proj': depth * 2 * N * r * E,
    'mamba.scan': depth * 2 * 3 * N * E * n,  # a*s + b, (delta u) * B, C . s
    'mamba.out_proj': depth * 2 * N * E * d,
    'branch.adaLN': depth * 2 * D * 3 * d,
    'fusion.qkv': depth * 2 * N * d * 3 * d,
    'fusion.attention': depth * 2 * 2 * N * N * d,  # two attentions: q k^T and p v
    'fusion.proj': depth * N * D * D,
    'block.adaLN': depth * D * 3 * D,
    'block.mlp': depth * mlp,
    # the shared transformer, applied `groups` times
    'shared.adaLN': groups * D * 6 * D,
    'shared.qkv': groups * N * D * 3 * D,
    'shared.attention': groups * 2 * N * N * D,
    'shared.proj': groups * N * D * D,
    'shared.mlp': groups * mlp,
    'cond_proj*': depth * 2 * D * E,
  }
  if model.cond_mamba == 'h0':
    c['cond_proj'] = c.pop('cond_proj*')
  # Elementwise work that calflops counts, at flops / 2, in the paper's convention: GELU on
  # N x 4D per MLP, SiLU on c per adaLN, affine-free LayerNorm at 4 flops per element, the
  # Haar analysis convs (4 d N per level), the patch-embedding bias adds.
  gelu = model.mlp_ratio * N * D / 2
  c['calflops.elementwise*'] = (
    depth * (gelu + 3 * D / 2 + model.wavelet_levels * 4 * d * N)
    + D / 2
    + (D / 2 + 2 * N * D)
    + N * D / 2
  )  # t_embedder, final layer, x_embedder
  c['shared.calflops.elementwise*'] = groups * (gelu + D / 2 + 2 * 2 * N * D)
  return c


def dit_components(model) -> dict[str, float]:
  """Multiply-accumulates per image of the DiT baseline (MLP fc1/fc2, 4 attention linears)."""
  D, depth, p = model.hidden_size, model.depth, model.patch_size
  g = model.input_size // p
  N = g * g
  H = int(D * model.mlp_ratio)
  return {
    'x_embedder': N * model.in_channels * p * p * D,
    't_embedder': 256 * D + D * D,
    'final_layer': D * 2 * D + N * D * p * p * model.in_channels,
    'block.adaLN': depth * D * 6 * D,
    'block.qkv': depth * N * D * 3 * D,
    'block.attention': depth * 2 * N * N * D,
    'block.proj': depth * N * D * D,
    'block.mlp': depth * 2 * N * D * H,
  }


def dim_components(model: dim.DiM) -> dict[str, float]:
  """Multiply-accumulates per image of DiM (models/dim.py) at its own token grid h x w: every
  block's Mamba runs over the whole padded sequence of L = E + 3 + (h + 3)(w + 3) tokens (E = 2
  extra tokens, 1 unconditional), the skip Linear (2D -> D, either form) once per consumer, the
  two depthwise 3x3 smoothers over the h w patches; adaLN-single's Linear runs once."""
  D, depth, p = model.hidden_size, model.depth, model.patch_size
  h, w = model.table_grid()
  N = h * w
  extra = 2 if model.num_classes else 1
  L = extra + dim.PAD_LEN + (h + dim.PAD_LEN) * (w + dim.PAD_LEN)
  E, n, k = dim.EXPAND * D, dim.D_STATE, dim.D_CONV
  r = math.ceil(D / 16)
  consumers = (depth - 1) // 2
  return {
    'x_embedder': N * model.in_channels * p * p * D,
    't_embedder': 256 * D + D * D,
    'adaln_single': D * 3 * D,
    'smoothers': 2 * N * D * 3 * 3,
    'mamba.in_proj': depth * L * D * 2 * E,
    'mamba.conv1d': depth * L * E * k,
    'mamba.x_proj': depth * L * E * (r + 2 * n),
    'mamba.dt_proj': depth * L * r * E,
    'mamba.scan': depth * 3 * L * E * n,  # a*s + b, (delta u) * B, C . s
    'mamba.out_proj': depth * L * E * D,
    'skip_linear': consumers * L * 2 * D * D,
    'final_layer': D * 2 * D + N * D * p * p * model.in_channels,
  }


def port_macs(components: dict[str, float]) -> float:
  """Everything this port computes: all components without a '*'."""
  return sum(v for key, v in components.items() if not key.endswith('*'))


PAPER_EXCLUDED = (
  'mamba.in_proj',
  'mamba.dt_proj',
  'mamba.conv1d',
  'mamba.scan',
  'fusion.attention',
  'shared.attention',
)


def paper_macs(components: dict[str, float], shared_attention: bool = True) -> float:
  """Upstream's calflops count (flops / 2); see the module docstring for what it sees."""
  return sum(
    value
    for key, value in components.items()
    if key not in PAPER_EXCLUDED and (shared_attention or not key.startswith('shared.'))
  )


# ---------------------------------------------------------------- report


def report(cfg, rolled_only: bool = False, out=print) -> dict[str, Any]:
  """Print (and return) parameter and FLOP counts of the model described by cfg."""
  model = models.create_model(cfg)
  inputs = example_inputs(cfg)
  variables = abstract_params(model, inputs)
  total, per = param_counts(variables)
  forward = lambda v, x, t, y: model.apply(v, x, t, y)
  args = (variables, *inputs)

  out(
    f'model {cfg.name}, input {cfg.input_size}x{cfg.input_size}x{cfg.in_channels} '
    f'(image {8 * cfg.input_size} px), num_classes {cfg.num_classes}, batch 1, float32'
  )
  out(f'parameters: {total:,} ({total / 1e6:.2f} M)')
  for name, count in sorted(per.items(), key=lambda kv: -kv[1]):
    out(f'  {name:<16} {count:>14,}')

  result = {'params': total, 'params_per_module': per}
  found = loops(forward, *args)
  start = time.perf_counter()
  rolled = xla_flops(forward, *args, unroll=False)
  result['xla_flops_rolled'] = rolled
  out(
    f'XLA flops, as compiled (scan bodies counted once; scans {found["scan"]}): '
    f'{rolled / 1e9:.3f} G  [{time.perf_counter() - start:.1f} s]'
  )
  if found['while']:
    out(f'WARNING: {len(found["while"])} while loop(s) in the forward: counted once each.')
  if rolled_only:
    return result
  start = time.perf_counter()
  flops = xla_flops(forward, *args, unroll=True)
  result['xla_flops'] = flops
  out(
    f'XLA flops, scans unrolled: {flops / 1e9:.3f} GFLOPs = {flops / 2e9:.3f} G '
    f'multiply-accumulates  [{time.perf_counter() - start:.1f} s]'
  )

  if isinstance(model, DiMSUM):
    components = dimsum_components(model)
  elif isinstance(model, dim.DiM):
    components = dim_components(model)
  else:
    components = dit_components(model)
  result['components'] = components
  port = port_macs(components)
  scale, unit = (1e9, 'G') if port >= 1e9 else (1e6, 'M')
  out(f'analytic multiply-accumulates ({unit}):')
  for key, value in components.items():
    out(f'  {key:<30} {value / scale:10.3f}')
  result['analytic_macs'] = port
  out(
    f'analytic, this port: {port / scale:.3f} {unit} multiply-accumulates '
    f'(XLA / 2 is {flops / 2 / port:.3f}x: norms, activations, softmax and scan '
    f'elementwise work)'
  )
  if isinstance(model, DiMSUM):
    with_attn, without = paper_macs(components), paper_macs(components, shared_attention=False)
    result['paper_macs'] = with_attn
    published = PAPER_GMACS.get((cfg.name, cfg.input_size))
    note = (
      f'; published {published} G'
      if published and model.depth == 16 and model.hidden_size == 1024
      else ''
    )
    out(
      f'paper convention (calflops flops/2): {with_attn / scale:.2f} {unit} with the shared '
      f'attention, {without / scale:.2f} {unit} without{note}'
    )
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cfg = model_config(
    FLAGS.config,
    name=FLAGS.model,
    input_size=FLAGS.input_size,
    num_classes=FLAGS.num_classes,
    depth=FLAGS.depth,
    hidden_size=FLAGS.hidden_size,
  )
  report(cfg, rolled_only=FLAGS.rolled)


def cli():
  """The `dimsum-flops` console script."""
  command_line.run(main, FLAGS, config_flag='config')


if __name__ == '__main__':
  cli()
