"""Evaluation: FID, sFID, Inception Score, precision/recall (ADM's definitions) in JAX.

  inception.py        the FID Inception-v3 (TF 2015-12-05 graph, as pytorch-fid ports it) in Flax,
                      and the importer of pytorch-fid's weight file
  digits_features.py  a small classifier of the offline digits set (fitted once, cached): features
                      for an FID-like metric and the sample accuracy, no download
  config.py           the `config.eval` block: `default_eval_config()` and its `validate`
  features.py         FeatureNet, `build_feature_net(config)`, and the Extractor (jitted,
                      batched, split over every device)
  metrics.py          Fréchet distance, IS, k-NN precision/recall, `evaluate_images`
  reference_batch.py  ADM reference batches: the Reference, read and written, made from images
  reference.py        python -m dimsum_jax.evaluate.reference: a reference batch written from our
                      data sources (chunked, resumable)
  sweep.py            FID versus NFE / guidance, one cached set of initial noises for all settings
  training.py         config.eval during training: sample with the EMA, score, keep the best
  command.py          python -m dimsum_jax.evaluate --samples=... --reference=... --inception=...
                      (__main__.py runs it); prepare() checks the inputs before sampling

From code:

  from dimsum_jax import evaluate
  config = evaluate.default_eval_config()          # features, weights, reference, metrics
  net = evaluate.build_feature_net(config)
  ref = evaluate.reference_for(config, net, image_shape)   # or load_reference(path)
  extractor = evaluate.Extractor(net)              # compiled once, reused across evaluations
  scores = evaluate.evaluate_images(images_uint8, labels, ref, net, extractor=extractor)

Names are imported on first use, so `python -m dimsum_jax.evaluate.<module>` runs cleanly.
"""

import importlib

_EXPORTS = {
  "FeatureNet": "features",
  "Extractor": "features",
  "build_feature_net": "features",
  "default_eval_config": "config",
  "EvalConfigError": "config",
  "EvaluationError": "metrics",
  "evaluate_images": "metrics",
  "evaluate_features": "metrics",
  "frechet_distance": "metrics",
  "inception_score": "metrics",
  "precision_recall": "metrics",
  "Reference": "reference_batch",
  "load_reference": "reference_batch",
  "save_reference": "reference_batch",
  "reference_from_images": "reference_batch",
  "reference_for": "reference_batch",
  "digits_feature_net": "digits_features",
  "digits_reference": "digits_features",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
