"""Write a reference batch from our data sources: python -m dimsum_jax.evaluate.reference.

  python -m dimsum_jax.evaluate.reference --dataset=image_folder --data_dir=DIR \\
      --image_size=256 --inception=pt_inception-2015-12-05-6726825d.pth --out=ref256.npz
  python -m dimsum_jax.evaluate.reference --dataset=imagenet2012 --data_dir=$TFDS_DATA_DIR ...
  python -m dimsum_jax.evaluate.reference --dataset=latents --data_dir=latents/in256 \\
      --vae_dir=vae ...                       # decoded through the VAE; mirrors skipped
  python -m dimsum_jax.evaluate.reference --dataset=digits --features=digits --out=digits.npz

reads the images through dimsum_jax.data (ADM centre crop, no flips, file order; with
--num_images below the set's size, the first images of a seeded shuffle), in chunks of
--chunk_size images. After each chunk the running statistics (count, mean, centred second moment
in float64, merged exactly) and the chunk's precision/recall images are saved under
OUT.partial/; rerunning the same command continues after the last saved chunk (other settings
into the same OUT are refused). arr_0 holds --pr_images images (10 000 as ADM) at positions drawn
uniformly by --seed over the images read. The .npz is written last, atomically, and OUT.partial/
is then removed. Progress (images/s, ETA) is logged per chunk.

OUT is an ADM reference batch (mu, sigma, mu_s, sigma_s, arr_0 uint8 [M, H, W, 3], plus
feature_net, num_images and source), the format of dimsum_jax.evaluate.reference_batch, which
reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from dimsum_jax import command_line

from dimsum_jax.evaluate import metrics as metrics_lib
from dimsum_jax.evaluate import npz
from dimsum_jax.evaluate.features import Extractor, FeatureNet
from dimsum_jax.evaluate.metrics import EvaluationError, Moments
from dimsum_jax.evaluate.reference_batch import Reference, load_reference, save_reference

DATASETS = ("digits", "image_folder", "imagenet2012", "celeb_a_hq", "lsun_church", "latents")


# ------------------------------------------------------------------------------------------------
# The resumable writer


@dataclasses.dataclass
class Stream:
  """uint8 image batches from position `start` (in images) of a data source, and its size."""

  total: int  # images the reference covers
  description: str
  batches: object  # callable(start) -> iterator of uint8 [b, H, W, C]
  close: object = None  # callable() that stops the source's background work


def _digits_stream(args) -> Stream:
  from dimsum_jax.evaluate import digits_features  # pylint: disable=g-import-not-at-top

  images, _ = digits_features.digits_images(args.image_size, args.channels)
  total = len(images) if not args.num_images else min(args.num_images, len(images))
  if total < len(images):  # a uniform subset: the first images of a seeded permutation
    images = images[np.random.default_rng(args.seed).permutation(len(images))[:total]]

  def batches(start):
    for s in range(start, total, args.read_batch):
      yield images[s : s + args.read_batch]

  return Stream(total, f"digits:{args.image_size}x{args.image_size}x{args.channels}", batches)


def _source_stream(args) -> Stream:
  """image_folder / tfds / latents through dimsum_jax.data (latents decoded by the VAE)."""
  from dimsum_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  c = data_lib.default_data_config()
  c.name, c.data_dir, c.split = args.dataset, args.data_dir, args.split
  c.tfds_name = getattr(args, "tfds_name", "")
  c.image_size, c.channels, c.crop = args.image_size, args.channels, args.crop
  c.class_conditional, c.random_flip, c.num_epochs = False, False, 1
  c.drop_remainder, c.global_batch_size, c.on_bad_image = False, args.read_batch, "fail"
  c.shuffle = False
  decode, step, what = None, 1, f"{args.dataset}:{args.data_dir}"
  if args.dataset == "latents":
    meta = data_lib.read_meta(args.data_dir)
    c.image_size, c.channels = meta["latent_shape"][0], meta["latent_shape"][2]
    step = 2 if meta.get("flip_doubled") else 1  # row 2k: image k, row 2k + 1: its mirror
    decode = _vae_decoder(args.vae_dir)
    what += " (decoded by the VAE" + (", mirrors skipped)" if step == 2 else ")")
    c.global_batch_size = args.read_batch * step  # even: every batch starts at an image
  source = data_lib.create_dataset(c)
  n = source.num_examples // step
  total = n if not args.num_images else min(args.num_images, n)
  if total < n:
    c.shuffle = True  # a uniform subset: the first images of a seeded permutation
    what += f", {total} of {n} images (shuffled with seed {args.seed})"
    source.close()
    source = data_lib.create_dataset(c, seed=args.seed)

  def batches(start):
    source.set_state({"epoch": 0, "index": start * step})
    left = total - start
    for batch in source:
      rows = batch["image"][::step] if step == 2 else batch["image"]
      rows = rows[:left]
      left -= len(rows)
      yield decode(rows) if decode else np.clip(127.5 * rows + 128.0, 0, 255).astype(np.uint8)
      if left <= 0:
        break

  return Stream(total, what, batches, source.close)


def _vae_decoder(vae_dir):
  if not vae_dir:
    raise EvaluationError(
      "A latent set is decoded through its VAE: pass --vae_dir=DIR of a VAE "
      "converted with `python -m dimsum_jax.vae.convert`."
    )
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from dimsum_jax import sharding  # pylint: disable=g-import-not-at-top
  from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate.features import extraction_mesh  # pylint: disable=g-import-not-at-top

  mesh = extraction_mesh()
  module, params = vae_lib.load_vae(vae_dir, sharding=sharding.replicated(mesh))
  batch_sharding = sharding.batch_sharding(mesh)
  fn = jax.jit(functools.partial(vae_lib.decode_latents, module), out_shardings=batch_sharding)
  n_dev = mesh.devices.size

  def decode(latents):
    n = len(latents)
    pad = -n % n_dev
    x = np.concatenate([latents, np.zeros((pad, *latents.shape[1:]), latents.dtype)])
    return np.asarray(jax.device_get(fn(params, jax.device_put(x, batch_sharding))))[:n]

  return decode


def _identity(args, stream, net):
  return {
    "format": 1,
    "source": stream.description,
    "total": stream.total,
    "tfds_name": getattr(args, "tfds_name", ""),
    "feature_net": net.name,
    "pr_images": args.pr_images,
    "chunk_size": args.chunk_size,
    "seed": args.seed,
    "image_size": args.image_size,
    "channels": args.channels,
    "crop": args.crop,
  }


def write_reference(
  args, net: FeatureNet, stream: Stream | None = None, stop_after_chunks: int | None = None
) -> Reference | None:
  """The resumable writer of the CLI (module docstring). `stop_after_chunks` (tests) leaves after
  that many new chunks, as an interrupted run would; returns None then.

  OUT.partial/ holds pr-K.npy (the arr_0 images of chunk K), moments-K.npz (the statistics after
  chunk K) and state.json, replaced last: the chunk is done when state.json names its moments.
  """
  if stream is None:
    stream = _digits_stream(args) if args.dataset == "digits" else _source_stream(args)
  try:
    return _write(args, net, stream, stop_after_chunks)
  finally:
    if stream.close is not None:
      stream.close()


def _write(args, net, stream, stop_after_chunks):
  out = os.path.abspath(args.out)
  if stream.total < 2:
    raise EvaluationError(
      f"{stream.description} holds {stream.total} images; a reference needs at least 2."
    )
  partial = out + ".partial"
  identity = _identity(args, stream, net)
  state_path = os.path.join(partial, "state.json")
  state = {"identity": identity, "images": 0, "chunks": 0}
  if os.path.exists(state_path):
    with open(state_path, encoding="utf-8") as f:
      state = json.load(f)
    if state["identity"] != identity:
      changed = sorted(k for k in identity if state["identity"].get(k) != identity[k])
      raise EvaluationError(
        f"{partial} holds a reference started with other settings "
        f"({', '.join(changed)}): rerun with the same flags to resume, or "
        "delete it."
      )
  os.makedirs(partial, exist_ok=True)
  kinds = [k for k in ("pool", "spatial") if k in net.dims]
  moments = {k: Moments(0, np.zeros(net.dims[k]), np.zeros((net.dims[k],) * 2)) for k in kinds}
  if state["chunks"]:
    with np.load(
      os.path.join(partial, f"moments-{state['chunks'] - 1:06d}.npz"), allow_pickle=False
    ) as z:
      moments = {k: Moments(int(z[f"{k}_n"]), z[f"{k}_mean"], z[f"{k}_m2"]) for k in kinds}
  pr_count = min(args.pr_images, stream.total)
  pr_positions = np.sort(
    np.random.default_rng(args.seed).choice(stream.total, pr_count, replace=False)
  )
  extractor = Extractor(net, kinds=kinds)
  done, new_chunks, t0 = state["images"], 0, time.monotonic()
  logging.info(
    "Reference of %s with %s features: %d images, %d already done, chunks of %d.",
    stream.description,
    net.name,
    stream.total,
    done,
    args.chunk_size,
  )
  rows = _Rows(stream.batches(done))
  while done < stream.total:
    images = rows.take(min(args.chunk_size, stream.total - done))
    if images is None:
      break
    metrics_lib.check_images(images, what=f"The images of {stream.description}")
    feats = extractor(images, what="reference images")
    arrays = {}
    for k in kinds:
      moments[k] = moments[k].merge(Moments.of(feats[k]))
      arrays.update(
        {f"{k}_n": moments[k].n, f"{k}_mean": moments[k].mean, f"{k}_m2": moments[k].m2}
      )
    k = state["chunks"]
    picked = pr_positions[(pr_positions >= done) & (pr_positions < done + len(images))] - done
    np.save(os.path.join(partial, f"pr-{k:06d}.npy"), images[picked])
    npz.write_npz(os.path.join(partial, f"moments-{k:06d}.npz"), arrays)
    done += len(images)
    state.update(images=done, chunks=k + 1)
    npz.write_json(state_path, state)
    if k:
      os.remove(os.path.join(partial, f"moments-{k - 1:06d}.npz"))
    rate = (new_chunks * args.chunk_size + len(images)) / max(time.monotonic() - t0, 1e-9)
    logging.info(
      "Reference: %d/%d images (%.1f%%), %.1f images/s, ETA %.0f s.",
      done,
      stream.total,
      100.0 * done / stream.total,
      rate,
      (stream.total - done) / rate,
    )
    new_chunks += 1
    if stop_after_chunks is not None and new_chunks >= stop_after_chunks and done < stream.total:
      return None
  pr_files = [os.path.join(partial, f"pr-{i:06d}.npy") for i in range(state["chunks"])]
  shapes = [np.load(p, mmap_mode="r").shape for p in pr_files]
  pool, spatial = moments["pool"], moments.get("spatial")
  ref = Reference(
    mu=pool.mean,
    sigma=pool.sigma,
    mu_s=spatial.mean if spatial else None,
    sigma_s=spatial.sigma if spatial else None,
    feature_net=net.name,
    num_stat_images=pool.n,
    source=stream.description,
    path=out,
  )
  arr_0 = ((sum(s[0] for s in shapes), *shapes[0][1:]), (np.load(p) for p in pr_files))
  save_reference(out, ref, arr_0=arr_0)
  shutil.rmtree(partial)
  logging.info("Wrote %s: statistics of %d images, %d images in arr_0.", out, pool.n, arr_0[0][0])
  return load_reference(out)


class _Rows:
  """Rows from an iterator of row blocks, `take(n)` at a time (a block may straddle two takes)."""

  def __init__(self, blocks):
    self._blocks, self._pending = iter(blocks), None

  def take(self, n: int) -> np.ndarray | None:
    """The next `n` rows (fewer at the end; None when nothing is left)."""
    parts = [] if self._pending is None else [self._pending]
    have = sum(len(p) for p in parts)
    while have < n:
      block = next(self._blocks, None)
      if block is None:
        break
      parts.append(block)
      have += len(block)
    if not have:
      return None
    rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
    self._pending = rows[n:] if len(rows) > n else None
    return rows[:n]


# ------------------------------------------------------------------------------------------------
# Command line


FLAGS = flags.FlagValues()  # this command's own (see dimsum_jax.command_line)
flags.DEFINE_enum(
  "dataset",
  None,
  list(DATASETS),
  "Where the images come from (read through dimsum_jax.data; latents: decoded through --vae_dir).",
  flag_values=FLAGS,
)
flags.DEFINE_string("data_dir", "", "Image folder, tfds data_dir or latent set.", flag_values=FLAGS)
flags.DEFINE_string("split", "train", "tfds split.", flag_values=FLAGS)
flags.DEFINE_string(
  "tfds_name", "", "tfds builder ('' = the usual one of --dataset).", flag_values=FLAGS
)
flags.DEFINE_integer("image_size", None, "Pixels (default: 256; digits: 16).", flag_values=FLAGS)
flags.DEFINE_integer("channels", None, "Image channels (default: 3; digits: 1).", flag_values=FLAGS)
flags.DEFINE_string("crop", "adm", "adm, resize_center or none.", flag_values=FLAGS)
flags.DEFINE_string(
  "vae_dir", "", "Latent sets: the converted VAE that decodes them.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "num_images",
  0,
  "Images whose statistics are taken, the first of a seeded shuffle (0: all, in file order).",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "pr_images", 10_000, "Images kept in arr_0 (precision/recall).", flag_values=FLAGS
)
flags.DEFINE_integer(
  "chunk_size", 10_000, "Images per saved chunk (what a rerun resumes after).", flag_values=FLAGS
)
flags.DEFINE_integer("read_batch", 256, "Images read per batch.", flag_values=FLAGS)
flags.DEFINE_integer(
  "seed", 0, "Shuffle (with --num_images) and arr_0's positions.", flag_values=FLAGS
)
flags.DEFINE_enum(
  "features", "inception", ["inception", "digits"], "The feature net.", flag_values=FLAGS
)
flags.DEFINE_string(
  "inception", "", "pytorch-fid's pt_inception-2015-12-05-*.pth (or its .npz).", flag_values=FLAGS
)
flags.DEFINE_enum(
  "preprocess",
  "pytorch_fid",
  ["pytorch_fid", "tf"],
  "Inception input: pytorch-fid's resize, or the TF graph's.",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "batch_size", 50, "Images per device per step of the feature net.", flag_values=FLAGS
)
flags.DEFINE_string(
  "cache_dir", "", "Digits features cache ('' = ~/.cache/dimsum_jax).", flag_values=FLAGS
)
flags.DEFINE_string(
  "out",
  None,
  "The .npz to write (never overwritten; OUT.partial/ holds the chunks until it is).",
  flag_values=FLAGS,
)
flags.mark_flags_as_required(["dataset", "out"], flag_values=FLAGS)


def writer_args(**settings):
  """The command's settings as write_reference reads them: its flags' defaults, then `settings`,
  then the dataset's image_size and channels where they are None."""
  args = command_line.defaults(FLAGS, **settings)
  digits = args.dataset == "digits"
  args.image_size = args.image_size or (16 if digits else 256)
  args.channels = args.channels or (1 if digits else 3)
  return args


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from dimsum_jax.evaluate import config as eval_config  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import features as features_lib  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import inception  # pylint: disable=g-import-not-at-top

  args = writer_args(**FLAGS.flag_values_dict())
  try:
    if args.chunk_size < 1 or args.pr_images < 0 or args.read_batch < 1:
      raise EvaluationError("--chunk_size and --read_batch must be positive, --pr_images >= 0.")
    if os.path.exists(args.out):
      raise EvaluationError(
        f"{args.out} exists: choose another --out, or delete it to write it again."
      )
    config = eval_config.default_eval_config()
    config.update(
      features=args.features,
      inception_weights=args.inception,
      preprocess=args.preprocess,
      batch_size=args.batch_size,
      cache_dir=args.cache_dir or config.cache_dir,
    )
    net = features_lib.build_feature_net(config)
    ref = write_reference(args, net)
  except (
    EvaluationError,
    inception.WeightsError,
    npz.NpzError,
    FileNotFoundError,
    ValueError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(
    f"Wrote {args.out}: {ref.num_stat_images} images ({ref.source}), {ref.num_images} in "
    f"arr_0, {net.name} features."
  )
  return 0


def cli():
  """python -m dimsum_jax.evaluate.reference."""
  command_line.run(main, FLAGS)


if __name__ == "__main__":
  cli()
