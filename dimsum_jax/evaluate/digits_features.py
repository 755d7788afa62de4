"""Features for the offline digits default: a small MLP fitted on scikit-learn's digits, offline.

The net (Flax), for uint8 images [N, H, W, C] of any size and 1 or 3 channels:
  grey = mean over channels -> bilinear resize to 16 x 16 (half-pixel centres, as
  dimsum_jax.data.digits builds the set) -> (u - 127.5) / 127.5, flattened   [N, 256]
  dense 128, ReLU    [N, 128]
  dense 64, ReLU     [N, 64]   -> "pool" (the features of the FID-like metric, precision/recall)
  dense 10           [N, 10]   -> "logits" = "is_logits" (the digit classes)
No spatial features, so no sFID. (A small CNN separates the classes no better, 97-98% held out,
and fits 5x slower on a CPU.)

Fitting is deterministic: the 1 797 digits of dimsum_jax.data.digits at 16 x 16 (one channel),
passed through uint8 exactly as samples are (clip(127.5 x + 128) truncated), images whose index
is not a multiple of 5 for training (1 437) and the others held out (360); initialisation from
PRNGKey(0); full-batch Adam (learning rate 1e-2), 200 steps of softmax cross-entropy, on the CPU
(so a GPU host fits the same weights). It takes a few seconds and is done once: the weights are
cached in CACHE_DIR/digits_features_v1.npz (default ~/.cache/dimsum_jax/; written atomically,
read with allow_pickle=False; a damaged cache is fitted again). The held-out accuracy is kept in
the cache and in `net.info`.

`digits_feature_net(cache_dir)` returns the FeatureNet (classifies_labels=True: its logits index
the digit classes, so evaluate_images reports the sample accuracy, the fraction of samples
classified as their label); `digits_reference(net, image_size, channels)` the reference built
from all 1 797 digits at the samples' size, in dimsum_jax.evaluate.reference_batch's format.
"""

from __future__ import annotations

import functools
import logging
import os

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dimsum_jax.data import digits as digits_data
from dimsum_jax.evaluate.features import FeatureNet

NAME = "digits-mlp-v1"
CACHE_FILE = "digits_features_v1.npz"
DEFAULT_CACHE = os.path.join("~", ".cache", "dimsum_jax")
SIZE = 16
STEPS = 200
LEARNING_RATE = 1e-2
log = logging.getLogger(__name__)


def to_uint8(images):
  """[-1, 1] -> uint8 as the sampler writes them: clip(127.5 x + 128, 0, 255), truncated."""
  return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def preprocess(images):
  """uint8 [N, H, W, C] -> float32 [N, 16, 16, 1] in [-1, 1]."""
  x = jnp.mean(jnp.asarray(images).astype(jnp.float32), axis=-1, keepdims=True)
  h, w = x.shape[1], x.shape[2]
  hi = jax.lax.Precision.HIGHEST
  if w != SIZE:
    x = jnp.einsum(
      "nhwc,xw->nhxc",
      x,
      jnp.asarray(digits_data.resize_matrix(w, SIZE, "bilinear"), jnp.float32),
      precision=hi,
    )
  if h != SIZE:
    x = jnp.einsum(
      "nhxc,yh->nyxc",
      x,
      jnp.asarray(digits_data.resize_matrix(h, SIZE, "bilinear"), jnp.float32),
      precision=hi,
    )
  return (x - 127.5) / 127.5


class DigitsMLP(nn.Module):
  """uint8 images -> {pool [N, 64], logits, is_logits [N, 10]}."""

  @nn.compact
  def __call__(self, images):
    hi = jax.lax.Precision.HIGHEST
    x = preprocess(images).reshape(images.shape[0], SIZE * SIZE)
    x = nn.relu(nn.Dense(128, precision=hi, name="hidden")(x))
    pool = nn.relu(nn.Dense(64, precision=hi, name="dense")(x))
    logits = nn.Dense(digits_data.NUM_CLASSES, precision=hi, name="head")(pool)
    return {"pool": pool, "logits": logits, "is_logits": logits}


DIMS = {"pool": 64, "logits": 10, "is_logits": 10}


def training_data():
  """(uint8 [1797, 16, 16, 1], labels, train mask): the digits as the sampler would write them."""
  images, labels = digits_data.load_digits_images(SIZE, 1)
  train = np.arange(len(labels)) % 5 != 0
  return to_uint8(images), labels, train


def fit() -> tuple[dict, float]:
  """(params, held-out accuracy): the deterministic fit described in the module docstring."""
  images, labels, train = training_data()
  cpu = jax.devices("cpu")[0]
  net = DigitsMLP()
  with jax.default_device(cpu):
    x_train, y_train = jnp.asarray(images[train]), jnp.asarray(labels[train])
    params = net.init(jax.random.PRNGKey(0), x_train[:1])["params"]
    opt = optax.adam(LEARNING_RATE)

    def loss_fn(p):
      logits = net.apply({"params": p}, x_train)["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()

    @jax.jit
    def step(p, s):
      updates, s = opt.update(jax.grad(loss_fn)(p), s, p)
      return optax.apply_updates(p, updates), s

    state = opt.init(params)
    for _ in range(STEPS):
      params, state = step(params, state)
    params = jax.device_get(params)
    held = net.apply({"params": params}, jnp.asarray(images[~train]))["logits"]
    accuracy = float(np.mean(np.argmax(np.asarray(held), -1) == labels[~train]))
  return params, accuracy


def _save(path, params, accuracy):
  flat = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, heldout_accuracy=np.float64(accuracy), **flat)
  os.replace(tmp, path)


def _load(path):
  with np.load(path, allow_pickle=False) as z:
    accuracy = float(z["heldout_accuracy"])
    flat = {tuple(k.split("/")): z[k] for k in z.files if k != "heldout_accuracy"}
  params = flax.traverse_util.unflatten_dict(flat)
  want = jax.eval_shape(
    DigitsMLP().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, SIZE, SIZE, 1), jnp.uint8)
  )["params"]
  if jax.tree.structure(want) != jax.tree.structure(params) or any(
    a.shape != b.shape for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(params))
  ):
    raise ValueError("another network's parameters")
  return params, accuracy


def load_or_fit(cache_dir: str | None = None) -> tuple[dict, float]:
  """(params, held-out accuracy) from the cache, fitting and caching them on first use."""
  cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE)
  path = os.path.join(cache_dir, CACHE_FILE)
  if os.path.exists(path):
    try:
      return _load(path)
    except Exception as e:  # pylint: disable=broad-except
      log.warning(
        "The cached digits features %s cannot be read (%s: %s); fitting them again.",
        path,
        type(e).__name__,
        e,
      )
  params, accuracy = fit()
  _save(path, params, accuracy)
  log.info(
    "Fitted the digits features (held-out accuracy %.4f) and cached them in %s.", accuracy, path
  )
  return params, accuracy


def digits_feature_net(cache_dir: str | None = None, batch_size: int = 256) -> FeatureNet:
  params, accuracy = load_or_fit(cache_dir)
  return FeatureNet(
    name=NAME,
    apply=DigitsMLP().apply,
    variables={"params": params},
    dims=dict(DIMS),
    batch_size=batch_size,
    classifies_labels=True,
    info={"heldout_accuracy": accuracy},
  )


@functools.lru_cache(maxsize=8)
def digits_images(image_size: int = SIZE, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """All 1 797 digits as uint8 [N, size, size, channels] (as samples are written) and labels."""
  images, labels = digits_data.load_digits_images(image_size, channels)
  return to_uint8(images), labels


def digits_reference(net: FeatureNet, image_size: int = SIZE, channels: int = 1, extractor=None):
  """The reference of all 1 797 digits at the samples' size (see reference_batch.Reference)."""
  from dimsum_jax.evaluate import reference_batch  # pylint: disable=g-import-not-at-top

  images, _ = digits_images(image_size, channels)
  return reference_batch.reference_from_images(
    images, net, extractor=extractor, source=f"digits:{image_size}x{image_size}x{channels}"
  )
