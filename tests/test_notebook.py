"""notebooks/sampling.ipynb runs top to bottom on the small digits export and shows the grid that
`python -m dimsum_jax.sample` writes for the same settings."""

import base64
import io
import os

import nbclient
import nbformat
import numpy as np
from PIL import Image

from dimsum_jax import sample
from tests.test_sample_cli import SETTINGS, digits_run, reference_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'sampling.ipynb')


def _run_notebook(export_dir, monkeypatch, **extra_env):
  """(printed text, shown grid [h, w, 3] uint8) of the notebook on `export_dir` with SETTINGS."""
  env = {
    'DIMSUM_CHECKPOINT': str(export_dir),
    'DIMSUM_PER_CLASS': '1',
    'DIMSUM_CFG_SCALE': str(SETTINGS['cfg_scale']),
    'DIMSUM_SOLVER': SETTINGS['solver'],
    'DIMSUM_NUM_STEPS': str(SETTINGS['num_steps']),
    'DIMSUM_BATCH_SIZE': str(SETTINGS['batch_size']),
    'DIMSUM_SEED': str(SETTINGS['seed']),
    'JAX_PLATFORMS': 'cpu',
    **extra_env,
  }
  for k, v in env.items():
    monkeypatch.setenv(k, v)  # the kernel inherits this environment
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
    nb,
    timeout=300,
    kernel_name='python3',
    resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}},
  ).execute()
  text = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
  pngs = [o['data']['image/png'] for o in nb.cells[-1].outputs if 'image/png' in o.get('data', {})]
  assert len(pngs) == 1
  return text, np.asarray(Image.open(io.BytesIO(base64.b64decode(pngs[0]))).convert('RGB'))


def _assert_shows(shown, reference):
  """`shown` is `reference` [h, w, 3] scaled up by an integer factor (nearest), to one level."""
  scale = shown.shape[1] // reference.shape[1]
  assert scale >= 1 and shown.shape == (reference.shape[0] * scale, reference.shape[1] * scale, 3)
  diff = np.abs(shown[::scale, ::scale].astype(int) - reference.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.02


def test_notebook_shows_the_class_grid(tmp_path_factory, monkeypatch):
  _, export_dir = digits_run(tmp_path_factory)
  # The CLI reference: 10 samples (one per class), global batches of 8, Euler with CFG.
  reference = np.asarray(Image.open(reference_run(tmp_path_factory) / 'grid.png'))
  text, shown = _run_notebook(export_dir, monkeypatch)
  assert 'at step 2: 10 classes, images (8, 8, 1)' in text
  assert 'NFE per batch: [4, 4]' in text
  _assert_shows(shown, reference)


def test_notebook_samples_above_the_trained_size(tmp_path_factory, monkeypatch):
  """IMAGE_SIZE=16 with Upsample Guidance on the 8 px model shows the CLI's 16 px guided grid."""
  _, export_dir = digits_run(tmp_path_factory)
  out = tmp_path_factory.getbasetemp() / 'digits_samples_16'
  sample.run(
    checkpoint=str(export_dir), out=str(out), image_size=16, upsample_guidance=1.0, **SETTINGS
  )
  reference = np.asarray(Image.open(out / 'grid.png'))
  text, shown = _run_notebook(
    export_dir, monkeypatch, DIMSUM_IMAGE_SIZE='16', DIMSUM_UPSAMPLE_GUIDANCE='1.0'
  )
  assert 'images (16, 16, 1)' in text
  _assert_shows(shown, reference)
