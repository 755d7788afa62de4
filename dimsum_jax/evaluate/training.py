"""Evaluation during training: `config.eval` (dimsum_jax.evaluate.config) in the training loop.

  evaluator = training.prepare(config, mesh, model, abstract_ema, vae)   # None when off
  manager = checkpoint.create_manager(workdir, keep=..., best=eval_config.best(config.eval))
  if evaluator is not None and evaluator.due(step, done):
    scores = evaluator(step, ema_params, writer, manager)    # {metric: float} or None
    checkpoint.save(manager, step, ..., metrics=scores)

`prepare` runs eval_config.validate, builds the feature net and the reference (for the digits
features: every digit at the samples' size), checks the metrics they allow against the config,
and compiles the sampler ahead for the EMA parameters as they lie (abstract_ema: their
ShapeDtypeStructs with shardings). Every failure is one EvalConfigError sentence, raised before
the training loop touches its workdir.

Every `every_steps` steps and at the last step, `num_samples` images uint8 [N, H, W, C] are drawn
with the EMA parameters by dimsum_jax.sampler.sample_batch in global batches of
`sample_batch_size` split over every device of the training mesh (FSDP-sharded parameters are
used where they lie): sample i starts from the noise fold_in(split(PRNGKey(seed))[0], i) and has
label i % num_classes, as `python -m dimsum_jax.sample --seed=SEED` draws them, so a checkpoint
sampled there with the same solver, steps, guidance, batch size and devices gives these images.
They are scored by dimsum_jax.evaluate.evaluate_images against the reference (one Extractor and
the reference's features reused across evaluations) and written through the run's metric writer
(TensorBoard and metrics.jsonl) as eval/<metric> (fid, sfid, inception_score, precision, recall,
accuracy), eval/nfe (model evaluations per sample batch), eval/seconds and eval/best_step (the
step of the best `best_metric` so far, this run and the checkpoints before it). The scores also
go into that step's checkpoint (Orbax's metrics), where dimsum_jax.checkpoint keeps the
checkpoint of the best `best_metric` besides the last keep_checkpoints; the value lives in the
checkpoint, so a resumed run ranks against it. A failed evaluation (an ODE that does not finish,
NaN samples) is logged as an error and training goes on.
"""

from __future__ import annotations

import functools
import os
import time

from absl import logging
import jax
import numpy as np

from dimsum_jax import model_loading
from dimsum_jax import sampler
from dimsum_jax import sampling
from dimsum_jax import sharding
from dimsum_jax.evaluate import command
from dimsum_jax.evaluate import config as eval_config
from dimsum_jax.evaluate import features as features_lib
from dimsum_jax.evaluate import metrics as metrics_lib


def output_shape(config, vae) -> tuple[int, int, int]:
  """(H, W, C) of a sample: the model's input, or its VAE decoding (vae: (lib, module, params))."""
  m = config.model
  if vae is None:
    return (m.input_size, m.input_size, m.in_channels)
  module = vae[1]
  side = m.input_size * module.downsampling_factor
  return (side, side, module.out_channels)


def prepare(config, mesh, model, abstract_ema, vae=None):
  """The Evaluator of config.eval (None when every_steps is 0), after every check; raises
  EvalConfigError. abstract_ema: ShapeDtypeStructs (with shardings) of the EMA parameters; vae:
  (vae module library, module, params) of a latent model, else None."""
  c = config.eval
  eval_config.validate(c, config.model, mesh.size, config.vae.dir)
  if not c.every_steps:
    return None
  conditional = config.model.num_classes > 0
  args = command.eval_args(
    features=c.features,
    inception=c.inception_weights,
    preprocess=c.preprocess,
    reference=os.path.expanduser(c.reference) if c.reference else "",
    metrics=c.metrics,
    batch_size=c.batch_size,
    cache_dir=c.cache_dir,
  )
  try:
    net, reference, metrics = command.prepare(
      args, output_shape(config, vae), c.num_samples, has_labels=conditional
    )
  except (ValueError, OSError) as e:  # EvaluationError, WeightsError, NpzError: one sentence
    raise eval_config.EvalConfigError(f"config.eval: {e}") from e
  eval_config.check_metrics(c, metrics, conditional)
  return Evaluator(config, mesh, model, abstract_ema, vae, net, reference, metrics)


class Evaluator:
  """Samples with the EMA parameters and scores them (see the module docstring)."""

  def __init__(self, config, mesh, model, abstract_ema, vae, net, reference, metrics):
    c = config.eval
    self.every_steps, self.num_samples = c.every_steps, c.num_samples
    self.net, self.reference, self.metrics = net, reference, tuple(metrics)
    self.best = eval_config.best(c)
    self.opts = sampler.sampling_options(
      solver=c.solver, num_steps=c.num_steps, cfg_scale=c.cfg_scale, seed=c.seed
    )
    self.batch = sampler.batch_size_for(c.num_samples, c.sample_batch_size, mesh.size)
    self.classes = tuple(range(config.model.num_classes))
    self.labels = sampler.labels_for(np.arange(self.num_samples), self.classes)
    self.conditional = bool(self.classes)
    vae_module, self._vae_params = (vae[1], vae[2]) if vae is not None else (None, None)
    m = config.model
    fn = functools.partial(
      sampler.sample_batch,
      model=model,
      config=config,
      opts=self.opts,
      image_shape=(m.input_size, m.input_size, m.in_channels),
      vae_module=vae_module,
    )
    self._batch_sharding = sharding.batch_sharding(mesh)
    indices = jax.ShapeDtypeStruct((self.batch,), np.int32, sharding=self._batch_sharding)
    start = time.monotonic()
    # Compiled now (before the run writes anything): images come back whole on every process.
    self._sample = (
      jax.jit(fn, out_shardings=sharding.replicated(mesh))
      .lower(abstract_ema, self._vae_params, indices, indices)
      .compile()
    )
    logging.info(
      "Compiled the evaluation sampler in %.1f s (%d samples in batches of %d, %s, "
      "NFE %s, guidance %g; %s features: %s).",
      time.monotonic() - start,
      self.num_samples,
      self.batch,
      c.solver,
      "adaptive" if c.solver == "dopri5" else c.num_steps,
      c.cfg_scale,
      net.name,
      ", ".join(self.metrics),
    )
    kinds = sorted({metrics_lib.NEEDS[m] for m in self.metrics})
    self._extractor = features_lib.Extractor(net, kinds=kinds)

  def due(self, step: int, done: bool) -> bool:
    return done or step % self.every_steps == 0

  def samples(self, ema_params):
    """(uint8 [num_samples, H, W, C], NFE per batch); raises ODESolveError / SampleError."""
    images, nfes = [], []
    for start in range(0, self.num_samples, self.batch):
      indices = np.arange(start, start + self.batch, dtype=np.int32)
      put = lambda a: jax.device_put(a, self._batch_sharding)  # the same on every process
      out = self._sample(
        ema_params, self._vae_params, put(indices), put(sampler.labels_for(indices, self.classes))
      )
      last = min(start + self.batch, self.num_samples) - 1
      nfes.append(sampler.check_batch_result(out, self.opts, f"{start}-{last}")[0])
      images.append(np.asarray(jax.device_get(out[0])))
    return np.concatenate(images)[: self.num_samples], nfes

  def __call__(self, step: int, ema_params, writer, manager=None) -> dict | None:
    """Samples, scores and writes the metrics of `step`; returns {metric: value} for the
    checkpoint, or None when the evaluation failed (logged). manager: the run's checkpoint
    manager, whose best checkpoint eval/best_step ranks against."""
    start = time.monotonic()
    with jax.transfer_guard("allow"):
      try:
        images, nfes = self.samples(ema_params)
        result = metrics_lib.evaluate_images(
          images,
          self.labels if self.conditional else None,
          self.reference,
          self.net,
          metrics=self.metrics,
          extractor=self._extractor,
        )
      except (sampling.ODESolveError, model_loading.SampleError, metrics_lib.EvaluationError) as e:
        logging.error("No evaluation at step %d: %s", step, e)
        return None
    scores = {k: float(v) for k, v in result.items() if k not in ("num_samples", "feature_net")}
    seconds = time.monotonic() - start
    scalars = {f"eval/{k}": v for k, v in scores.items()}
    scalars.update({"eval/nfe": float(np.mean(nfes)), "eval/seconds": seconds})
    note = ""
    if self.best is not None:
      best_step, best_value = self._best_so_far(step, scores, manager)
      scalars["eval/best_step"] = best_step
      note = f"; best {self.best[0]} {best_value:.5g} at step {best_step}"
    writer.write_scalars(step, scalars)
    logging.info(
      "Evaluation at step %d (%d samples, %s features, %.1f s): %s%s.",
      step,
      self.num_samples,
      self.net.name,
      seconds,
      ", ".join(f"{k} {v:.5g}" for k, v in scores.items()),
      note,
    )
    return scores

  def _best_so_far(self, step, scores, manager):
    """(step, value) of the best tracked metric: this one, or the manager's best checkpoint
    (a tie goes to the newer, as in Orbax's ranking)."""
    key, mode = self.best
    previous = manager.best() if manager is not None else None
    if previous is not None and key in previous[1]:
      old = float(previous[1][key])
      if (old < scores[key]) if mode == "min" else (old > scores[key]):
        return previous[0], old
    return step, scores[key]
