"""The files of a sampling run: resumable chunks, the manifest, PNGs, the grid and samples.npz.

OUT receives
  images/000000.png ...   one PNG per sample, numbered by sample index
  grid.png                the first (up to) GRID_MAX samples; conditional: one column per class
  samples.npz             arr_0: uint8 [N, H, W, C]; labels: int32 [N]  (written last, atomically)
  summary.json            NFE per batch and timings
  manifest.json, chunks/  the settings of the run and the finished global batches (for resuming)

A chunk file chunks/<first>-<stop>.npz holds one process's contiguous rows of one global batch:
images uint8 [rows, H, W, C], indices and labels int32 [rows], the batch's nfe and num_steps. A
global batch is done when chunk files cover all its rows (`done_batches`); a rerun with the same
manifest skips it, and one with other settings is refused (`check_manifest`). Every file is
written whole under a temporary name and renamed into place (io_utils.atomic_write), so a killed
run leaves only complete files and stray temporaries, which `prepare` removes. samples.npz is
streamed from the chunks (`iter_rows`, `write_npz`), never held in memory whole.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from dimsum_jax import io_utils
from dimsum_jax import sampler
from dimsum_jax.model_loading import SampleError

GRID_MAX = 100
MANIFEST = 'manifest.json'
CHUNKS = 'chunks'
IMAGES = 'images'
FINAL_FILES = ('samples.npz', 'grid.png', 'summary.json')  # rewritten at the end of every run


def make_grid(images, cols: int, pad: int = 2) -> np.ndarray:
  """uint8 [n, H, W, C] -> one uint8 RGB image, `cols` per row, white gaps; blanks fill the end."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  if c == 1:
    images = np.repeat(images, 3, axis=-1)
  elif c != 3:
    images = np.repeat(images[..., :1], 3, axis=-1)
  cols = max(1, min(cols, n))
  rows = -(-n // cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
    ] = images[i]
  return grid


def grid_columns(n: int, classes: Sequence[int]) -> int:
  """Columns of the grid of n samples: one per class for 2 to 20 classes, else a square."""
  if 1 < len(classes) <= 20:
    return len(classes)
  return max(1, math.ceil(math.sqrt(n)))


def save_png(path, image):
  """uint8 [H, W, C] (C = 1 or 3) as a PNG at `path`, written whole."""
  image = np.asarray(image)
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  io_utils.atomic_write(path, lambda f: pil.save(f, format='PNG'))


def chunk_name(start, stop):
  """The chunk file of samples start .. stop - 1."""
  return f'{start:09d}-{stop:09d}.npz'


def _parse_chunk(name):
  if not name.endswith('.npz') or name.startswith('.'):
    return None
  try:
    a, b = name[:-4].split('-')
    return int(a), int(b)
  except ValueError:
    return None


def chunk_files(chunk_dir):
  """{(start, stop): path} of the complete chunk files in chunk_dir (temporaries skipped)."""
  if not os.path.isdir(chunk_dir):
    return {}
  out = {}
  for name in os.listdir(chunk_dir):
    rng = _parse_chunk(name)
    if rng is not None:
      out[rng] = os.path.join(chunk_dir, name)
  return out


def done_batches(chunk_dir, batch, num_batches):
  """Which global batches are fully covered by chunk files."""
  covered = np.zeros(num_batches * batch, bool)
  for a, b in chunk_files(chunk_dir):
    covered[a : min(b, covered.size)] = True
  return covered.reshape(num_batches, batch).all(axis=1)


def own_rows(array):
  """[(start, stop, rows)] of this process's rows of a batch-sharded global array (contiguous
  runs merged); each row once even when replicated across devices."""
  pieces = []
  for shard in array.addressable_shards:
    if shard.replica_id != 0:
      continue
    sl = shard.index[0]
    pieces.append(
      (
        sl.start or 0,
        sl.stop if sl.stop is not None else array.shape[0],
        jax.device_get(shard.data),
      )
    )
  pieces.sort(key=lambda p: p[0])
  merged = []
  for a, b, rows in pieces:
    if merged and merged[-1][1] == a:
      pa, _, prow = merged[-1]
      merged[-1] = (pa, b, np.concatenate([prow, rows]))
    else:
      merged.append((a, b, rows))
  return merged


def manifest(loaded, opts, batch, classes):
  """What makes the samples of a run what they are: the weights, the output shape, the global
  batch, the classes and the sampling options that change samples (sampler.key_settings)."""
  return {
    'format': 1,
    'source': loaded.source,
    'step': loaded.step,
    'vae_dir': loaded.config.vae.dir if loaded.is_latent else None,
    'image_shape': list(loaded.output_shape),
    'batch_size': batch,
    'classes': list(classes),
    'interpolation': loaded.interpolation,
    **sampler.key_settings(opts),
  }


def check_manifest(out, manifest):
  """True when OUT holds a run with this manifest (resume it), False when OUT holds none;
  SampleError when OUT's run used other settings or its manifest is missing or damaged."""
  path = os.path.join(out, MANIFEST)
  if not os.path.exists(path):
    if chunk_files(os.path.join(out, CHUNKS)):
      raise SampleError(f'{out} holds sample chunks but no {MANIFEST}: choose another --out.')
    return False
  try:
    old = io_utils.read_json(path)
  except ValueError as e:
    raise SampleError(f'{path} is damaged: choose another --out.') from e
  for key in sorted(set(old) | set(manifest)):
    if old.get(key) != manifest.get(key):
      flag = {'source': 'checkpoint', 'vae_dir': 'vae_dir', 'image_shape': 'checkpoint'}.get(
        key, key
      )
      raise SampleError(
        f'{out} holds samples made with other settings ({key} was {old.get(key)!r}, now '
        f'{manifest.get(key)!r}): rerun with the same flags (--{flag}) to resume, or choose '
        'another --out.'
      )
  return True


def write_npz(path, num_samples, image_shape, chunk_iter, labels):
  """samples.npz (arr_0 uint8 [N, H, W, C], labels) streamed chunk by chunk, renamed at the end."""
  shape = (num_samples, *image_shape)
  header = {
    'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
    'fortran_order': False,
    'shape': shape,
  }

  def write(f):
    with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
      with z.open('arr_0.npy', 'w', force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        written = 0
        for rows in chunk_iter:
          if rows.shape[1:] != tuple(image_shape):
            raise ValueError(f'chunk rows of shape {rows.shape[1:]}, expected {image_shape}')
          member.write(np.ascontiguousarray(rows, np.uint8).tobytes())
          written += rows.shape[0]
        assert written == num_samples, (written, num_samples)
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asarray(labels, np.int32))
      # A fixed date, as arr_0.npy has: the same samples give the same bytes whenever written.
      z.writestr(zipfile.ZipInfo('labels.npy', date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())

  io_utils.atomic_write(path, write)


def iter_rows(chunk_dir, num_samples, classes, image_dir, write_pngs):
  """Rows 0..N-1 from the chunk files in order (checking their labels); fills in missing PNGs."""
  files = sorted(chunk_files(chunk_dir).items())
  pos = 0
  for (a, b), path in files:
    if b <= pos:
      continue
    if a > pos:
      break
    with np.load(path, allow_pickle=False) as z:
      images, labels = z['images'], z['labels']
    take = slice(pos - a, min(b, num_samples) - a)
    if not np.array_equal(labels[take], sampler.labels_for(np.arange(a, b), classes)[take]):
      raise SampleError(f'{path} holds other labels than this run expects: choose another --out.')
    rows = images[take]
    if write_pngs:
      for k, image in enumerate(rows):
        png = png_path(image_dir, pos + k)
        if not os.path.exists(png):
          save_png(png, image)
    yield rows
    pos += rows.shape[0]
    if pos >= num_samples:
      return
  if pos < num_samples:
    raise SampleError(
      f'The chunk files of samples {pos} onwards are missing from {chunk_dir}: '
      'with several processes, --out must be on a file system that all of them '
      'share.'
    )


def png_path(image_dir, index):
  """The PNG of sample `index`."""
  return os.path.join(image_dir, f'{index:06d}.png')


def prepare(out, manifest, resuming):
  """Process 0's start of a run in OUT: chunks/ and images/ made, the temporary files of an
  interrupted run and the previous run's FINAL_FILES removed, the manifest written unless
  resuming."""
  chunk_dir, image_dir = os.path.join(out, CHUNKS), os.path.join(out, IMAGES)
  os.makedirs(chunk_dir, exist_ok=True)
  os.makedirs(image_dir, exist_ok=True)
  for d in (out, chunk_dir, image_dir):  # leftovers of an interrupted run
    for name in os.listdir(d):
      if name.startswith('.') and '.tmp-' in name:
        os.remove(os.path.join(d, name))
  for name in FINAL_FILES:
    if os.path.exists(os.path.join(out, name)):
      os.remove(os.path.join(out, name))
  if not resuming:
    io_utils.write_json(os.path.join(out, MANIFEST), manifest, indent=2)


def write_batch(out, images, start, labels, nfe, steps, *, num_samples, pngs):
  """This process's rows of the finished global batch of samples start, start + 1, ...: `images`
  a batch-sharded global array [B, H, W, C] uint8, `labels` [B]. Each contiguous run of rows
  becomes one chunk file (with the batch's nfe and steps) and, with `pngs`, one PNG per sample
  below num_samples."""
  chunk_dir, image_dir = os.path.join(out, CHUNKS), os.path.join(out, IMAGES)
  for a, b, rows in own_rows(images):  # a, b: rows of this batch
    first = start + a  # the sample index of rows[0]
    if pngs:
      for i in range(first, min(first + b - a, num_samples)):
        save_png(png_path(image_dir, i), rows[i - first])
    arrays = dict(
      images=rows,
      indices=np.arange(first, first + b - a),
      labels=labels[a:b],
      nfe=np.int32(nfe),
      num_steps=np.int32(steps),
    )
    io_utils.atomic_write(
      os.path.join(chunk_dir, chunk_name(first, first + b - a)),
      lambda f, arrays=arrays: np.savez(f, **arrays),
    )


def nfe_per_batch(chunk_dir, batch, num_batches) -> dict[int, int]:
  """{global batch: its NFE} of the batches whose first rows are in a chunk file."""
  nfes = {}
  for (a, _), path in chunk_files(chunk_dir).items():
    if a % batch == 0 and a // batch < num_batches:
      with np.load(path, allow_pickle=False) as z:
        nfes[a // batch] = int(z['nfe'])
  return nfes


def write_grid(out, num_samples, classes):
  """OUT/grid.png: the first (up to) GRID_MAX samples from the chunk files, one column per class
  for up to 20 classes."""
  n_grid = min(num_samples, GRID_MAX)
  first = np.concatenate(
    list(iter_rows(os.path.join(out, CHUNKS), n_grid, classes, os.path.join(out, IMAGES), False))
  )
  save_png(os.path.join(out, 'grid.png'), make_grid(first, grid_columns(n_grid, classes)))


def write_samples(out, num_samples, image_shape, classes, pngs):
  """OUT/samples.npz (arr_0 uint8 [N, *image_shape], labels int32 [N]) from the chunk files,
  renamed into place when whole: its presence means the run is complete. With `pngs`, the PNGs
  that an interrupted run left unwritten are written on the way."""
  write_npz(
    os.path.join(out, 'samples.npz'),
    num_samples,
    image_shape,
    iter_rows(os.path.join(out, CHUNKS), num_samples, classes, os.path.join(out, IMAGES), pngs),
    sampler.labels_for(np.arange(num_samples), classes),
  )
