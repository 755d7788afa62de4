"""Sample images from a trained model: PNGs, a grid and samples.npz (resumable, multi-device).

  python -m dimsum_jax.sample --checkpoint=runs/digits/export --num_samples=100 --out=samples/digits
  python -m dimsum_jax.sample --workdir=runs/imagenet256 --num_samples=50000 --cfg_scale=1.4 \\
      --solver=dopri5 --seed=0 --out=samples/imagenet256_cfg1.4
  python -m dimsum_jax.sample --workdir=runs/in256_dim --mode=dpm --cfg_scale=1.4 --out=samples/dim

--mode=dpm is DiM's sampler for DiM's discrete noise-prediction models (transport path
ScaledLinear): DPM-Solver++ of order 3 ('fast', time-uniform, `dpm_solver.sample_dpm_solver`)
with --dpm_steps model evaluations (50), and guidance --cfg_scale = 1 + DiM's U-ViT scale.

--checkpoint is a directory written by `python -m dimsum_jax.export` (config.json + ema_params/) or
by `python -m dimsum_jax.convert` (model_config.json + params/); --workdir is a training directory,
whose newest good checkpoint (or --step) gives the EMA parameters.

OUT receives
  images/000000.png ...   one PNG per sample, numbered by sample index
  grid.png                the first (up to) 100 samples; conditional: one column per class
  samples.npz             arr_0: uint8 [N, H, W, C]; labels: int32 [N]  (written last, atomically)
  summary.json            NFE per batch and timings
  manifest.json, chunks/  the settings of the run and the finished global batches (for resuming)

Sample i starts from the noise jax.random.normal(fold_in(k, i), (H, W, C)), k =
jax.random.split(PRNGKey(seed))[0], and carries label classes[i % len(classes)], so what sample i
is does not depend on the device count. Samples are made in global batches of --batch_size (split
over every device of every process); each finished batch is saved under chunks/ (each process its
own rows, each file renamed into place when complete), and a rerun with the same flags skips those
batches. Dopri5's step sizes are chosen per batch, as upstream (--per_sample: one step-size
sequence per sample), so a sample depends on its batch mates within the solver tolerances: keep
--batch_size when resuming. The SDE's Brownian noise is drawn per global batch.
Several processes need an --out on a file system they all share (process 0 assembles the result).

Latent models (4 channels) are decoded by the VAE of config.vae.dir or --vae_dir.

This module is the command: loading lives in model_loading.py (`load_model`, `LoadedModel`,
`SampleError`), the jitted sampler in sampler.py (`sampling_options`, `generate`, `BatchSampler`),
and the files of OUT in sample_io.py; `load_model`, `LoadedModel`, `SampleError`,
`sampling_options` and `generate` are also reachable from here, for notebooks.

--evaluate=REF.npz scores samples.npz once it is written (dimsum_jax.evaluate): FID, sFID, IS,
precision/recall against an ADM-style reference batch with the Inception features of --inception
(pytorch-fid's weight file); --evaluate=digits uses the digits features against every digit at the
samples' size (no download). --features, --metrics and --preprocess are those of `python -m
dimsum_jax.evaluate`. Every evaluation check (weights, reference resolution, sample counts) runs
before any sampling; the scores go to OUT/evaluation-<reference name>.json and into summary.json.

--image_size=N samples at N px instead of the trained size: the model is rebuilt for the new
token grid (its scan orders and wavelet windows follow it) with the learned position table
interpolated (dimsum_jax.warm_start; --interpolation: auto = bicubic for DiMSUM, bilinear for
DiM; DiT's sin-cos table is rebuilt). A size that the patch or DiMSUM's wavelet layout cannot
take is refused by name. At m times the trained size, --upsample_guidance=THETA (--ug_eta)
adds Upsample Guidance from the model at its trained size
(upsample_guidance.make_upsample_guided_model_fn: the velocity form for flow matching, upstream's
noise form for DiM), one trained-size evaluation per guided step on top of the counted NFE.

--inference_scan_unroll and --inference_hoist_adaln choose how the model runs (the same function,
other kernels; models.INFERENCE_FIELDS): they default to the package's defaults, not to what the
checkpoint's config stored, and may change between a run and its resumption.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from dimsum_jax import checkpoint
from dimsum_jax import command_line
from dimsum_jax import io_utils
from dimsum_jax import model_loading
from dimsum_jax import models
from dimsum_jax import sample_io
from dimsum_jax import sampler
from dimsum_jax import sampling
from dimsum_jax import sharding
from dimsum_jax import warm_start

# The names a notebook or another program uses (see the module docstring for where they live).
LoadedModel = model_loading.LoadedModel
SampleError = model_loading.SampleError
load_model = model_loading.load_model
sampling_options = sampler.sampling_options
generate = sampler.generate


# ------------------------------------------------------------------------------------------------
# The command


def _prepare_evaluation(evaluate, eval_options, loaded, num_samples):
  """(evaluate.command args, what its prepare() returned) for --evaluate, or None; SampleError
  for any setting that would fail, before anything is sampled."""
  eval_options = dict(eval_options or {})
  if not evaluate:
    if eval_options:
      names = ', '.join(f'--{k}' for k in sorted(eval_options))
      raise SampleError(
        f'{names} {"applies" if len(eval_options) == 1 else "apply"} only with '
        '--evaluate: pass --evaluate=REF.npz (or --evaluate=digits), or leave '
        f'{"it" if len(eval_options) == 1 else "them"} out.'
      )
    return None
  from dimsum_jax.evaluate import command  # pylint: disable=g-import-not-at-top

  if evaluate == 'digits':
    if eval_options.setdefault('features', 'digits') != 'digits':
      raise SampleError(
        f'--evaluate=digits scores with the digits features, not '
        f'--features={eval_options["features"]}: leave --features out, or pass '
        '--evaluate=REF.npz.'
      )
  try:
    args = command.eval_args(reference='' if evaluate == 'digits' else evaluate, **eval_options)
    prepared = command.prepare(
      args, loaded.output_shape, num_samples, has_labels=loaded.num_classes > 0
    )
  except ValueError as e:  # EvaluationError, WeightsError, NpzError: one sentence each
    raise SampleError(str(e)) from e
  args.metrics = ','.join(prepared[2])
  return args, prepared


def _evaluate(evaluation, samples_path):
  """evaluate.command.run on the written samples: its result (also written as JSON beside)."""
  from dimsum_jax.evaluate import command  # pylint: disable=g-import-not-at-top

  args, prepared = evaluation
  args.samples = samples_path
  try:
    result = command.run(args, prepared)
  except ValueError as e:
    raise SampleError(str(e)) from e
  logging.info(
    'Evaluation (%d samples, %s features): %s; written to %s.',
    result['num_samples'],
    result['feature_net'],
    ', '.join(
      f'{label} {result[key]:.6g}' for key, label in command.LABELS.items() if key in result
    ),
    result['written_to'],
  )
  return result


def run(
  *,
  out,
  checkpoint=None,
  workdir=None,
  step=None,
  num_samples=64,
  batch_size=64,
  classes=None,
  vae_dir=None,
  pngs=True,
  devices=None,
  image_size=None,
  interpolation='auto',
  evaluate=None,
  eval_options=None,
  inference_options=None,
  **options,
):
  """The CLI without flags (see the module docstring); returns the summary dict (process 0).

  options: the sampling options of `sampling.SAMPLING_OPTIONS` (mode, solver, num_steps, atol,
  rtol, max_steps, per_sample, cfg_scale, upsample_guidance, ug_eta, sde_method, diffusion_form,
  diffusion_norm, last_step, last_step_size, dpm_steps, seed), checked by `sampling_options`.
  devices: the devices to use (default: all of every process).
  evaluate: a reference batch .npz or 'digits' to score samples.npz once written; eval_options:
  options of `python -m dimsum_jax.evaluate` (features, inception, metrics, preprocess,
  batch_size, split_size, cache_dir).
  image_size, interpolation: sample at another size than trained (see load_model).
  inference_options: {model.inference_* field: value or None (the default)}, how the model runs
  (model_loading.set_inference_options); never part of what makes the samples.
  """
  opts = sampler.sampling_options(**options)  # flags first: nothing loaded or written on a typo
  if not out:
    raise SampleError('Pass --out=DIR for the samples.')
  if num_samples < 1:
    raise SampleError('--num_samples must be positive.')
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise SampleError(f'--out={out} is a file: choose a directory.')
  if interpolation not in warm_start.INTERPOLATIONS:
    raise SampleError(
      f'Unknown --interpolation={interpolation}: use one of {", ".join(warm_start.INTERPOLATIONS)}.'
    )
  loaded = model_loading.load_model(
    checkpoint_dir=checkpoint,
    workdir=workdir,
    step=step,
    vae_dir=vae_dir,
    mesh=model_loading.sampling_mesh(devices),
    image_size=image_size,
    interpolation=interpolation,
    inference_options=inference_options,
  )
  sampler.check_mode(loaded, opts)
  classes = sampler.check_classes(loaded, classes)
  sampler.check_guidance(loaded, opts)
  sampler.check_upsample_guidance(loaded, opts)
  evaluation = _prepare_evaluation(evaluate, eval_options, loaded, num_samples)
  num_devices = loaded.mesh.devices.size
  batch = sampler.batch_size_for(num_samples, batch_size, num_devices)
  manifest = sample_io.manifest(loaded, opts, batch, classes)
  resuming = sample_io.check_manifest(out, manifest)
  is_main = jax.process_index() == 0
  chunk_dir = os.path.join(out, sample_io.CHUNKS)
  num_batches = -(-num_samples // batch)

  if is_main:
    sample_io.prepare(out, manifest, resuming)
  _sync('dimsum_jax.sample.setup')
  done = sample_io.done_batches(chunk_dir, batch, num_batches)
  done = _broadcast(done.astype(np.int32)).astype(bool)
  todo = [k for k in range(num_batches) if not done[k]]
  if is_main:
    logging.info(
      'Sampling %d images of %s (step %s) on %d devices, %d processes: %d global '
      'batches of %d, %d already done; %s, cfg %.3g, seed %d; writing to %s.',
      num_samples,
      loaded.config.model.name,
      loaded.step,
      num_devices,
      jax.process_count(),
      num_batches,
      batch,
      num_batches - len(todo),
      {'ode': opts.solver, 'dpm': f'DPM-Solver ({opts.dpm_steps} steps)'}.get(
        opts.mode, f'SDE {opts.sde_method}'
      ),
      opts.cfg_scale,
      opts.seed,
      out,
    )

  sample_seconds = 0.0
  if todo:
    batch_sampler = sampler.BatchSampler(loaded, opts, batch)
    logging.info('Compiled the sampler in %.1f s.', batch_sampler.compile_seconds)
    start_time = time.monotonic()
    with jax.transfer_guard('disallow'):
      for n, k in enumerate(todo):
        indices = np.arange(k * batch, (k + 1) * batch)
        labels = sampler.labels_for(indices, classes)
        result = batch_sampler(indices, labels)
        last = min(num_samples, (k + 1) * batch) - 1
        nfe, steps = sampler.check_batch_result(result, opts, f'{k * batch}-{last}')
        sample_io.write_batch(
          out, result[0], k * batch, labels, nfe, steps, num_samples=num_samples, pngs=pngs
        )
        sample_seconds = time.monotonic() - start_time
        rate = (n + 1) * batch / sample_seconds
        remaining = (len(todo) - n - 1) * batch / rate
        if is_main:
          logging.info(
            'Batch %d/%d (samples %d-%d): NFE %d%s, %.3g samples/s, ETA %s.',
            k + 1,
            num_batches,
            k * batch,
            last,
            nfe,
            f' ({steps} steps)' if opts.mode == 'ode' and opts.solver == 'dopri5' else '',
            rate,
            io_utils.hms(remaining),
          )

  _sync('dimsum_jax.sample.chunks_written')
  summary = None
  if is_main:
    nfe_all = sample_io.nfe_per_batch(chunk_dir, batch, num_batches)
    summary = {
      'num_samples': num_samples,
      'num_batches': num_batches,
      'nfe_per_batch': [nfe_all.get(k) for k in range(num_batches)],
      'nfe_mean': float(np.mean(list(nfe_all.values()))) if nfe_all else None,
      'batches_sampled_now': len(todo),
      'sampling_seconds_now': round(sample_seconds, 3),
      'devices': num_devices,
      'processes': jax.process_count(),
      **manifest,
    }
    sample_io.write_grid(out, num_samples, classes)
    io_utils.write_json(os.path.join(out, 'summary.json'), summary, indent=2)
    # samples.npz last, renamed into place when whole: its presence means the run is complete.
    sample_io.write_samples(out, num_samples, loaded.output_shape, classes, pngs)
    logging.info(
      'Wrote %d samples to %s (samples.npz, grid.png%s); NFE per batch: mean %.1f.',
      num_samples,
      out,
      ', images/' if pngs else '',
      summary['nfe_mean'] or 0,
    )
    if evaluation is not None:
      summary['evaluation'] = _evaluate(evaluation, os.path.join(out, 'samples.npz'))
      io_utils.write_json(os.path.join(out, 'summary.json'), summary, indent=2)
  _sync('dimsum_jax.sample.done')
  return summary


def _sync(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def _broadcast(array):
  if jax.process_count() == 1:
    return array
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.broadcast_one_to_all(array))


# ------------------------------------------------------------------------------------------------
# Flags

FLAGS = flags.FlagValues()


_DEFINE = {
  bool: flags.DEFINE_boolean,
  int: flags.DEFINE_integer,
  float: flags.DEFINE_float,
  str: flags.DEFINE_string,
}


def define_option_flags(flag_values=FLAGS):
  """One flag per sampling option of sampling.SAMPLING_OPTIONS: its name, its default, the type
  of its default and its help."""
  for name, (default, help_text) in sampling.SAMPLING_OPTIONS.items():
    _DEFINE[type(default)](name, default, help_text, flag_values=flag_values)


def define_flags(flag_values=FLAGS):
  """The command's flags, on `flag_values` (this module's own FLAGS, so that importing it next to
  other commands, e.g. in a notebook or the tests, defines no flag twice)."""
  on = {'flag_values': flag_values}
  flags.DEFINE_string(
    'checkpoint', None, 'Exported (dimsum_jax.export) or converted model dir.', **on
  )
  flags.DEFINE_string(
    'workdir', None, 'Training workdir: its newest good checkpoint (or --step).', **on
  )
  flags.DEFINE_integer('step', None, 'With --workdir: the checkpoint step to sample from.', **on)
  flags.DEFINE_string('out', None, 'Output directory (PNGs, grid.png, samples.npz).', **on)
  flags.DEFINE_integer('num_samples', 64, 'How many samples.', **on)
  flags.DEFINE_integer(
    'batch_size', 64, 'Global batch (over all devices); keep it when resuming.', **on
  )
  flags.DEFINE_list('classes', [], 'Class indices the samples cycle through (default: all).', **on)
  flags.DEFINE_string('vae_dir', None, 'VAE for latent models (default: config.vae.dir).', **on)
  flags.DEFINE_boolean('pngs', True, 'Write one PNG per sample under OUT/images/.', **on)
  define_option_flags(flag_values)
  flags.DEFINE_string(
    'evaluate',
    None,
    'Score samples.npz once written: an ADM-style reference '
    'batch .npz (Inception features), or "digits" (the digits features).',
    **on,
  )
  flags.DEFINE_string(
    'inception',
    None,
    "With --evaluate: pytorch-fid's "
    'pt_inception-2015-12-05-6726825d.pth (read from disk, never downloaded).',
    **on,
  )
  flags.DEFINE_enum(
    'features',
    None,
    ['inception', 'digits'],
    'With --evaluate: the features (default: inception; digits with --evaluate=digits).',
    **on,
  )
  flags.DEFINE_string(
    'metrics',
    None,
    'With --evaluate: a subset of fid,sfid,is,precision,recall,accuracy (default: all that apply).',
    **on,
  )
  flags.DEFINE_enum(
    'preprocess',
    None,
    ['pytorch_fid', 'tf'],
    'With --evaluate and Inception '
    "features: pytorch-fid's input resize (default) or the TF graph's.",
    **on,
  )
  flags.DEFINE_integer(
    'image_size', None, 'Sample at this many px (default: the trained size).', **on
  )
  flags.DEFINE_integer(
    'inference_scan_unroll',
    None,
    'Blocks (DiMSUM: block groups) per iteration of the model stack\'s loop; 0 unrolls it '
    '(a longer compile). Default: the package\'s, whatever the checkpoint stored.',
    **on,
  )
  flags.DEFINE_boolean(
    'inference_hoist_adaln',
    None,
    'DiMSUM: every block\'s adaLN Linear for all block groups as one batched matmul before the '
    'stack (fewer kernels at small batches). Default: the package\'s.',
    **on,
  )
  flags.DEFINE_string(
    'interpolation',
    'auto',
    'With --image_size: the position table\'s '
    'resizing, auto (the family\'s own), bicubic or bilinear.',
    **on,
  )


define_flags()

RUN_FLAGS = (
  'checkpoint',
  'workdir',
  'step',
  'out',
  'num_samples',
  'batch_size',
  'vae_dir',
  'pngs',
  'image_size',
  'interpolation',
  *sampling.SAMPLING_OPTIONS,
)
EVAL_FLAGS = ('inception', 'features', 'metrics', 'preprocess')  # options of dimsum_jax.evaluate
USER_ERRORS = (SampleError, checkpoint.CheckpointError, sampling.ODESolveError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    try:
      classes = [int(c) for c in FLAGS.classes]
    except ValueError as e:
      raise SampleError(
        f'--classes={",".join(FLAGS.classes)} must be integers, e.g. --classes=0,3,7.'
      ) from e
    sharding.initialize_distributed()
    eval_options = {name: FLAGS[name].value for name in EVAL_FLAGS if FLAGS[name].value is not None}
    run(
      classes=classes,
      evaluate=FLAGS.evaluate,
      eval_options=eval_options,
      inference_options={name: FLAGS[name].value for name in models.INFERENCE_FIELDS},
      **{name: FLAGS[name].value for name in RUN_FLAGS},
    )
  except USER_ERRORS as e:
    logging.error('%s', e)
    raise SystemExit(f'error: {e}') from e


def cli():
  """The `dimsum-sample` console script."""
  command_line.run(main, FLAGS)


if __name__ == '__main__':
  cli()
