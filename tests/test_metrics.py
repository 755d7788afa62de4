"""Metric writers (TensorBoard + metrics.jsonl), progress reports and the sample grid."""

import json
import os

import numpy as np
import pytest

from dimsum_jax import io_utils
from dimsum_jax import metrics
from tests import seeds


class Recorder:
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))


def test_report_progress_steps_per_second_images_and_eta(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(metrics.time, 'monotonic', lambda: clock[0])
  writer = Recorder()
  progress = metrics.ReportProgress(
    num_train_steps=1000, batch_size=32, writer=writer, every_steps=100
  )
  progress(0)  # the start: nothing to report yet
  with progress.timed('data'):
    clock[0] += 2.0
  clock[0] += 6.0  # 100 steps in 8 s, 2 of them waiting for data
  progress(50)  # not a report step
  progress(100)
  assert len(writer.scalars) == 1
  step, s = writer.scalars[0]
  assert step == 100
  assert s['steps_per_sec'] == pytest.approx(100 / 8.0)
  assert s['images_per_sec'] == pytest.approx(100 * 32 / 8.0)
  assert s['time_share/data'] == pytest.approx(2.0 / 8.0)
  clock[0] += 4.0  # the next 100 steps in 4 s
  progress(200)
  assert writer.scalars[1][1]['steps_per_sec'] == pytest.approx(25.0)
  assert 'time_share/data' not in writer.scalars[1][1]  # shares restart each report
  assert io_utils.hms((1000 - 200) / 25.0) == '0h00m32s'


@seeds.each()
def test_writer_keeps_scalars_in_jsonl_and_tensorboard(tmp_path, seed):
  rng = np.random.default_rng(seed)
  loss = float(rng.uniform())
  writer = metrics.create_writer(str(tmp_path), just_logging=False)
  writer.write_hparams({'model.name': 'DiMSUM-L/2', 'seed': 3})
  writer.write_scalars(7, {'loss': np.float32(loss), 'grad_norm': float('nan')})
  grid = rng.integers(0, 256, (1, 10, 12, 3)).astype(np.uint8)
  writer.write_images(7, {'ema_samples': grid})
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert rows[0] == {'hparams': {'model.name': 'DiMSUM-L/2', 'seed': 3}}
  assert rows[1]['step'] == 7 and rows[1]['grad_norm'] == 'nan'
  assert rows[1]['loss'] == pytest.approx(loss, rel=1e-6), f'seed {seed}'

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={'tensors': 0})
  events.Reload()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  (loss_event,) = events.Tensors('loss')
  assert loss_event.step == 7
  assert float(tf.make_ndarray(loss_event.tensor_proto)) == pytest.approx(loss, rel=1e-6), (
    f'seed {seed}'
  )
  (image_event,) = events.Tensors('ema_samples')
  png = tf.make_ndarray(image_event.tensor_proto)[2]  # [width, height, encoded image]
  np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), grid[0], err_msg=f'seed {seed}')


def test_other_processes_only_log(tmp_path):
  writer = metrics.create_writer(str(tmp_path), just_logging=True)
  writer.write_scalars(1, {'loss': 1.0})
  assert os.listdir(tmp_path) == []


@seeds.each()
def test_image_grid_one_class_per_row(seed):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (2 * 3, 4, 5, 1)).astype(np.float32)  # 2 rows of 3
  grid = metrics.image_grid(images, rows=2)
  assert grid.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2, 3) and grid.dtype == np.uint8
  for i in range(6):
    r, c = divmod(i, 3)
    tile = grid[2 + r * 6 : 2 + r * 6 + 4, 2 + c * 7 : 2 + c * 7 + 5]
    expected = np.clip(np.floor((images[i, ..., 0].astype(np.float64) + 1) * 127.5 + 0.5), 0, 255)
    for ch in range(3):
      np.testing.assert_array_equal(tile[..., ch], expected, err_msg=f'seed {seed}')
  assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()  # white gaps


def test_a_torn_last_line_is_dropped_when_the_run_resumes(tmp_path):
  """A kill mid-write leaves part of a line; the resumed writer appends after the last whole
  line, so every line of metrics.jsonl parses."""
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
  writer = metrics.JsonlWriter(str(path))
  writer.write_scalars(2, {'loss': 0.25})
  writer.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in rows] == [(1, 0.5), (2, 0.25)]
