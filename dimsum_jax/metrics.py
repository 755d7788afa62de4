"""Metric writers and progress reports that work with or without TensorFlow.

clu's metric writers (and clu.periodic_actions, which imports them) import tensorflow, which GPU
hosts usually lack. `create_writer` uses clu's writer (TensorBoard event files) when it imports,
and always also appends every scalar to WORKDIR/metrics.jsonl, so the numbers are kept either way.
`ReportProgress` is a small stand-in for clu.periodic_actions.ReportProgress.
"""

import contextlib
import importlib.util
import json
import math
import os
import time

from absl import logging
import numpy as np

from dimsum_jax import io_utils


class _QuietLibraries:
  """Drops INFO lines of chatty libraries (Orbax logs ~40 per checkpoint); warnings pass."""

  def __init__(self, packages):
    self._parts = tuple(f'{os.sep}{p}{os.sep}' for p in packages)

  def filter(self, record):
    return record.levelno >= 30 or not any(p in record.pathname for p in self._parts)


def quiet_library_logs(packages=('orbax',)):
  """Keeps the training log readable: library INFO lines are dropped from absl's handler."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries(packages))


def _scalar(v):
  v = float(np.asarray(v))
  return v if math.isfinite(v) else str(v)


class LoggingWriter:
  """Scalars and image shapes to the absl log."""

  def write_scalars(self, step, scalars):
    text = ', '.join(f'{k}={float(np.asarray(v)):.6g}' for k, v in sorted(scalars.items()))
    logging.info('[%d] %s', step, text)

  def write_images(self, step, images):
    for k, v in images.items():
      logging.info('[%d] image %s %s', step, k, np.shape(v))

  def write_hparams(self, hparams):
    logging.info('Hyperparameters: %s', hparams)

  def flush(self):
    pass

  def close(self):
    pass


class JsonlWriter:
  """One JSON line per write_scalars call: {"step": s, "loss": ..., ...}.

  Lines go out whole (line-buffered); a last line cut off by a kill is dropped when the file is
  opened again, so the resumed run appends after the last complete line."""

  def __init__(self, path):
    _drop_torn_last_line(path)
    self._file = open(path, 'a', encoding='utf-8', buffering=1)

  def write_scalars(self, step, scalars):
    row = {'step': int(step), 'time': time.time()}
    row.update({k: _scalar(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')

  def write_images(self, step, images):
    pass

  def write_hparams(self, hparams):
    self._file.write(json.dumps({'hparams': hparams}, default=str) + '\n')

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def _drop_torn_last_line(path):
  """Truncates `path` after its last newline (nothing to do if it is missing or ends in one)."""
  try:
    with open(path, 'rb+') as f:
      data = f.read()
      if data and not data.endswith(b'\n'):
        f.truncate(data.rfind(b'\n') + 1)
  except FileNotFoundError:
    pass


class MultiWriter:
  def __init__(self, writers):
    self._writers = writers

  def __getattr__(self, name):
    def call(*args, **kwargs):
      for w in self._writers:
        getattr(w, name)(*args, **kwargs)

    return call


def create_writer(workdir, *, just_logging):
  """Process 0 (just_logging=False): log + metrics.jsonl + TensorBoard if it can; others: log."""
  if just_logging:
    return LoggingWriter()
  writers = [JsonlWriter(os.path.join(workdir, 'metrics.jsonl'))]
  missing = [m for m in ('tensorflow', 'tensorboard') if importlib.util.find_spec(m) is None]
  try:
    if missing:
      raise ImportError(f'{" and ".join(missing)} not installed')
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # clu.metric_writers needs tensorflow and tensorboard.
    logging.warning(
      'TensorBoard summaries are off (%s): metrics go to the log and %s.',
      e,
      os.path.join(workdir, 'metrics.jsonl'),
    )
    writers.append(LoggingWriter())
  else:
    writers.append(metric_writers.create_default_writer(workdir, asynchronous=False))
    logging.info('Writing TensorBoard summaries and metrics.jsonl to %s.', workdir)
  return MultiWriter(writers)


class ReportProgress:
  """Every `every_steps` steps: steps/s, images/s, ETA and where the time went (timed blocks)."""

  def __init__(self, *, num_train_steps, batch_size, writer, every_steps=100):
    self._total = num_train_steps
    self._batch_size = batch_size
    self._writer = writer
    self._every = every_steps
    self._last_step = None
    self._last_time = None
    self._timings = {}

  def __call__(self, step):
    now = time.monotonic()
    if self._last_step is None:
      self._last_step, self._last_time = step, now
      return
    if step % self._every and step != self._total:
      return
    dt, ds = now - self._last_time, step - self._last_step
    if ds <= 0 or dt <= 0:
      return
    steps_per_sec = ds / dt
    eta = (self._total - step) / steps_per_sec
    scalars = {'steps_per_sec': steps_per_sec, 'images_per_sec': steps_per_sec * self._batch_size}
    shares = ', '.join(f'{k} {100 * v / dt:.1f}%' for k, v in sorted(self._timings.items()))
    for k, v in self._timings.items():
      scalars[f'time_share/{k}'] = v / dt
    self._writer.write_scalars(step, scalars)
    logging.info(
      'Step %d/%d (%.1f%%): %.3g steps/s, %.4g images/s, ETA %s%s',
      step,
      self._total,
      100 * step / self._total,
      steps_per_sec,
      scalars['images_per_sec'],
      io_utils.hms(eta),
      f' (time in {shares})' if shares else '',
    )
    self._last_step, self._last_time, self._timings = step, now, {}

  @contextlib.contextmanager
  def timed(self, name):
    start = time.monotonic()
    try:
      yield
    finally:
      self._timings[name] = self._timings.get(name, 0.0) + time.monotonic() - start


def flat_config(config):
  """{'section.key': value} of a (nested) config, values as scalars or strings: hparams."""
  out = {}
  for k, v in config.items():
    if hasattr(v, 'items'):
      out.update({f'{k}.{kk}': vv for kk, vv in flat_config(v).items()})
    else:
      out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


def image_grid(images, rows):
  """[rows*cols, H, W, C] floats in [-1, 1] -> uint8 [rows*H + pad, cols*W + pad, 3] with 2px gaps."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  cols = n // rows
  images = np.clip((images + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  if c == 1:
    images = np.repeat(images, 3, axis=-1)
  elif c != 3:
    images = np.repeat(images[..., :1], 3, axis=-1)
  pad = 2
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
  for i in range(rows * cols):
    r, q = divmod(i, cols)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
    ] = images[i]
  return grid
