"""The evaluation command: FID, sFID, Inception Score, precision, recall of a samples.npz.

  python -m dimsum_jax.evaluate --samples=OUT/samples.npz --reference=REF.npz \\
      --inception=pt_inception-2015-12-05-6726825d.pth
  python -m dimsum_jax.evaluate --samples=samples/digits --features=digits

--samples is what `python -m dimsum_jax.sample` writes (arr_0: uint8 [N, H, W, C], labels: [N]),
or its output folder (then FOLDER/samples.npz); it is streamed, never loaded whole. --reference
is an ADM reference batch (mu, sigma, mu_s, sigma_s, arr_0) or one written by `python -m
dimsum_jax.evaluate.reference`; with --features=digits it may be left out (then: all 1 797
digits at the samples' size). --inception is pytorch-fid's weight file (or its .npz), read once
from disk; nothing is downloaded.

Prints one line per metric and writes them, with what was compared, as JSON beside the samples:
OUT/evaluation-<reference name>.json (--out to choose), replaced atomically. Every input is
checked before anything is computed: a samples file of another layout or dtype, a reference of
another resolution or feature size, a weight file of another network, or fewer samples than a
metric needs is one sentence on stderr and exit status 1, and an earlier result stays as it was.
--metrics picks a subset (fid,sfid,is,precision,recall,accuracy; default: all that the features
and the reference allow, without accuracy for samples that carry no labels).

For other entry points: `prepare(eval_args(reference=..., inception=...), image_shape, n)` runs
every check before samples exist (what `python -m dimsum_jax.sample --evaluate` needs first), and
`run(args, prepared)` evaluates a written samples.npz with what prepare returned and writes the
JSON.
"""

from __future__ import annotations

import os
import sys
import time
import types

from absl import app
from absl import flags
import numpy as np

from dimsum_jax import command_line


FLAGS = flags.FlagValues()  # this command's own (see dimsum_jax.command_line)
flags.DEFINE_string(
  "samples",
  None,
  "samples.npz (arr_0 uint8 [N, H, W, C]), or the folder that holds it.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "reference",
  "",
  "Reference batch .npz: ADM's, or one written by python -m "
  "dimsum_jax.evaluate.reference (with --features=digits: may be left out).",
  flag_values=FLAGS,
)
flags.DEFINE_enum(
  "features", "inception", ["inception", "digits"], "The feature net.", flag_values=FLAGS
)
flags.DEFINE_string(
  "inception",
  "",
  "pytorch-fid's pt_inception-2015-12-05-*.pth (or its .npz), read from disk, never downloaded.",
  flag_values=FLAGS,
)
flags.DEFINE_enum(
  "preprocess",
  "pytorch_fid",
  ["pytorch_fid", "tf"],
  "Inception input: pytorch-fid's resize, or the TF graph's.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "metrics",
  "",
  "Comma-separated subset of fid,sfid,is,precision,recall,"
  "accuracy (default: all that the features and the reference allow).",
  flag_values=FLAGS,
)
flags.DEFINE_integer("batch_size", 50, "Images per device per step.", flag_values=FLAGS)
flags.DEFINE_integer("split_size", 5000, "Inception Score split size.", flag_values=FLAGS)
flags.DEFINE_string(
  "cache_dir", "", "Digits features cache ('' = ~/.cache/dimsum_jax).", flag_values=FLAGS
)
flags.DEFINE_string(
  "out",
  "",
  "The JSON file (default: evaluation-<reference name>.json beside the samples).",
  flag_values=FLAGS,
)
flags.mark_flag_as_required("samples", flag_values=FLAGS)


def read_samples(path):
  """(arr_0 reader, labels or None); EvaluationError for anything but uint8 [N, H, W, 1|3]."""
  from dimsum_jax.evaluate import npz  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate.metrics import EvaluationError  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise EvaluationError(
      f"The samples {path} do not exist: pass the samples.npz that "
      "`python -m dimsum_jax.sample` wrote."
    )
  try:
    images = npz.NpzArray(path, "arr_0")
  except npz.NpzError as e:
    raise EvaluationError(
      f"{e} Pass the samples.npz that `python -m dimsum_jax.sample` wrote."
    ) from e
  if len(images.shape) != 4 or images.shape[-1] not in (1, 3):
    raise EvaluationError(
      f"{path} holds arr_0 of shape {list(images.shape)}, not images "
      "[N, H, W, C] with C = 1 or 3: pass the samples.npz of `python -m "
      "dimsum_jax.sample`."
    )
  if images.dtype != np.uint8:
    raise EvaluationError(
      f"{path} holds arr_0 of dtype {images.dtype}, not uint8: convert the "
      "images to uint8 in [0, 255], as `python -m dimsum_jax.sample` writes "
      "them."
    )
  labels = None
  try:
    with np.load(path, allow_pickle=False) as z:
      if "labels" in z.files:
        labels = z["labels"]
  except ValueError as e:
    raise EvaluationError(
      f"{path} holds labels that are not a plain array: write them as int32 [N]."
    ) from e
  if labels is not None and (labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu"):
    raise EvaluationError(
      f"{path} holds labels {labels.dtype} {list(labels.shape)} for "
      f"{images.shape[0]} images: write them as int32 [N], or leave them "
      "out."
    )
  return images, labels


def default_out(samples, reference, features):
  stem = os.path.splitext(os.path.basename(reference))[0] if reference else features
  return os.path.join(os.path.dirname(os.path.abspath(samples)), f"evaluation-{stem}.json")


def eval_args(**overrides) -> types.SimpleNamespace:
  """The command's options as a namespace (its flags' defaults, then `overrides`), for callers
  such as `python -m dimsum_jax.sample --evaluate`."""
  unknown = sorted(set(overrides) - set(FLAGS))
  if unknown:
    raise ValueError(f"Unknown evaluation option {unknown[0]!r}.")
  return command_line.defaults(FLAGS, **overrides)


def prepare(args, image_shape, num_samples: int, has_labels: bool = True):
  """(feature net, reference, metrics) for samples of `image_shape` (H, W, C), after every check
  that can fail: call it before making the samples, so that a wrong flag costs no sampling."""
  from dimsum_jax.evaluate import config as eval_config  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import features as features_lib  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import reference_batch  # pylint: disable=g-import-not-at-top

  error = metrics_lib.EvaluationError
  if args.batch_size < 1 or args.split_size < 1:
    raise error("--batch_size and --split_size must be positive.")
  if args.features == "inception" and not args.reference:
    raise error(
      "The Inception features need a --reference batch (ADM's, e.g. "
      "VIRTUAL_imagenet256_labeled.npz, or one written by `python -m "
      "dimsum_jax.evaluate.reference`)."
    )
  ref = reference_batch.load_reference(args.reference) if args.reference else None
  requested = metrics_lib.parse_metrics(args.metrics) if args.metrics else None
  config = eval_config.default_eval_config()
  config.update(
    features=args.features,
    inception_weights=args.inception,
    preprocess=args.preprocess,
    batch_size=args.batch_size,
    cache_dir=args.cache_dir or config.cache_dir,
  )
  net = features_lib.build_feature_net(config)
  if ref is None:  # digits: every digit at the samples' size
    from dimsum_jax.evaluate import digits_features  # pylint: disable=g-import-not-at-top

    ref = digits_features.digits_reference(net, image_shape[0], image_shape[-1])
  metrics = requested or tuple(
    m for m in metrics_lib.available_metrics(net, ref) if has_labels or m != "accuracy"
  )
  ref.check_compatible(net, tuple(image_shape), metrics)
  metrics_lib.check_counts(metrics, num_samples, ref.num_images, args.split_size)
  if "accuracy" in metrics and not has_labels:
    raise error(
      "The samples have no labels, which the sample accuracy needs: leave accuracy "
      "out of --metrics."
    )
  return net, ref, metrics


def run(args, prepared=None) -> dict:
  """Everything but the printing; raises the user errors (EvaluationError, WeightsError, ...).
  prepared: what prepare() returned for these samples (its net, reference and metrics are used
  as they are, after the samples' shape and count are checked against them)."""
  from dimsum_jax.evaluate import features as features_lib  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import npz  # pylint: disable=g-import-not-at-top

  if os.path.isdir(args.samples):  # the output folder of python -m dimsum_jax.sample
    args.samples = os.path.join(args.samples, "samples.npz")
  images, labels = read_samples(args.samples)
  if prepared is None:
    net, ref, metrics = prepare(args, images.shape[1:], images.shape[0], labels is not None)
  else:
    net, ref, metrics = prepared
    ref.check_compatible(net, tuple(images.shape[1:]), metrics)
    metrics_lib.check_counts(metrics, images.shape[0], ref.num_images, args.split_size)
  start = time.monotonic()
  kinds = sorted({metrics_lib.NEEDS[m] for m in metrics})
  extractor = features_lib.Extractor(net, kinds=kinds)
  feats = extractor(images.batches(extractor.global_batch), total=images.shape[0], what="samples")
  ref_pool = ref.pool_features(extractor) if {"precision", "recall"} & set(metrics) else None
  scores = metrics_lib.evaluate_features(
    feats, labels, ref, metrics, ref_pool=ref_pool, split_size=args.split_size
  )
  result = {
    **scores,
    "num_samples": int(images.shape[0]),
    "samples": os.path.abspath(args.samples),
    "reference": os.path.abspath(args.reference) if args.reference else ref.source,
    "reference_images": ref.num_images,
    "reference_statistics_images": ref.num_stat_images,
    "feature_net": net.name,
    "metrics": list(metrics),
    "split_size": args.split_size,
    "devices": int(extractor.mesh.devices.size),
    "seconds": round(time.monotonic() - start, 3),
  }
  out = args.out or default_out(args.samples, args.reference, args.features)
  npz.write_json(out, result)
  result["written_to"] = out
  return result


LABELS = {
  "fid": "FID",
  "sfid": "sFID",
  "inception_score": "Inception Score",
  "precision": "Precision",
  "recall": "Recall",
  "accuracy": "Accuracy",
}


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from dimsum_jax.evaluate import inception  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import npz  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate.metrics import EvaluationError  # pylint: disable=g-import-not-at-top

  try:
    result = run(command_line.values(FLAGS))
  except (EvaluationError, inception.WeightsError, npz.NpzError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for key, label in LABELS.items():
    if key in result:
      print(f"{label}: {result[key]:.6g}")
  print(
    f"({result['num_samples']} samples, {result['feature_net']} features; written to "
    f"{result['written_to']})"
  )
  return 0


def cli():
  """The `dimsum-evaluate` console script (and python -m dimsum_jax.evaluate)."""
  command_line.run(main, FLAGS)
