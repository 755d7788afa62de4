"""The FID Inception-v3 (TensorFlow graph 2015-12-05) in Flax, as pytorch-fid ports it.

FID, sFID, Inception Score and precision/recall are defined on the features of one network: the
Inception-v3 graph `classify_image_graph_def.pb` of 2015-12-05, which TTUR's FID and OpenAI's ADM
evaluator (guided-diffusion/evaluations/evaluator.py) run. pytorch-fid (mseitzer/pytorch-fid)
rebuilds that graph from torchvision's Inception3 with four patched blocks and releases its
weights as a torch state dict, `pt_inception-2015-12-05-6726825d.pth`; this module builds the same
network in Flax, module for module under the port's names, and imports that file:

  weights = load_state_dict("pt_inception-2015-12-05-6726825d.pth")   # downloaded once, by you
  net = InceptionV3()
  variables = variables_from_state_dict(weights)   # refuses a file of another network, by key
  out = net.apply(variables, images_uint8)         # uint8 [N, H, W, 3] (or 1 channel)

`out` holds
  pool     float32 [N, 2048]  `pool_3:0`: the average pool after Mixed_7c (FID, precision/recall)
  logits   float32 [N, 1008]  `softmax/logits`: fc(pool) with its bias (the port's `fc`)
  is_logits float32 [N, 1008] pool @ fc.weight.T, WITHOUT the bias: what ADM (and improved-gan)
                              softmax for the Inception Score (`softmax/logits/MatMul` input 1)
  spatial  float32 [N, 2023]  `mixed_6/conv:0`, first 7 channels, flattened (sFID)

The spatial features. ADM's evaluator reads the tensor `mixed_6/conv:0` ([N, 17, 17, 192]),
keeps channels [..., :7] and flattens each image in TensorFlow's NHWC order: 17 * 17 * 7 = 2023
values, row by row, the 7 channels of a position together. In the 2015 graph the eleven Inception
blocks are named mixed, mixed_1, ..., mixed_10; they are the port's Mixed_5b, 5c, 5d, 6a, 6b, 6c,
6d, 6e, 7a, 7b, 7c, so `mixed_6` is Mixed_6d (an InceptionC block, 768 -> 768 at 17 x 17). Inside
a block the graph names its first convolution `conv` and the towers `tower/conv`,
`tower_1/conv`, ...; `conv` is the 1x1 branch, whose op `mixed_6/conv` is the ReLU after
Conv2D and BatchNormWithGlobalNormalization. In the port that is `Mixed_6d.branch1x1` (a
BasicConv2d: conv, BatchNorm(eps=0.001), ReLU, 192 channels). This net returns its first 7
channels in NHWC order, so the 2023 coordinates are ADM's and the `mu_s`/`sigma_s` of its
reference batches apply. (A CHW flattening would give the same sFID between two sets computed
alike, but not against ADM's statistics.)

Input. `preprocess="pytorch_fid"` (default) is the port's: images / 255, resized to 299 x 299 by
F.interpolate(mode="bilinear", align_corners=False) (half-pixel centres, no antialiasing, edges
clamped), then 2x - 1. `preprocess="tf"` is what the TensorFlow graph itself does to the float
[0, 255] input fed at `ExpandDims:0`, as ADM feeds it: the legacy ResizeBilinear (corner-aligned
source coordinates dst * in / out, half_pixel_centers=False), then (x - 128) / 128. The two give
slightly different features; ADM's published numbers come from "tf", pytorch-fid's from
"pytorch_fid". One-channel images are repeated to three.

The network in order (NHWC; the port's module names, which are this tree's names too):
  Conv2d_1a_3x3 (32, stride 2) -> Conv2d_2a_3x3 (32) -> Conv2d_2b_3x3 (64, pad 1) -> maxpool 3/2
  -> Conv2d_3b_1x1 (80) -> Conv2d_4a_3x3 (192) -> maxpool 3/2                       [N,35,35,192]
  -> Mixed_5b/5c/5d (FIDInceptionA: average pool without the padded zeros)           [N,35,35,288]
  -> Mixed_6a (InceptionB) -> Mixed_6b/6c/6d/6e (FIDInceptionC, same pool patch)      [N,17,17,768]
  -> Mixed_7a (InceptionD) -> Mixed_7b (FIDInceptionE_1, the same average pool)
  -> Mixed_7c (FIDInceptionE_2: a 3x3/1 MAX pool in its pool branch, as the TF graph)  [N,8,8,2048]
  -> global average pool (pool_3) -> fc (2048 -> 1008).
Every convolution is BasicConv2d: conv without bias, BatchNorm(eps=0.001, running statistics),
ReLU. No auxiliary classifier (the port builds aux_logits=False; its file has no AuxLogits keys).
Convolutions and matmuls run at Precision.HIGHEST (true float32 on GPUs, no TF32).

The weight file. `load_state_dict` reads a .pth with torch.load(weights_only=True) (torch needed:
`pip install -e ".[torch]"`) or an .npz of the same keys (allow_pickle=False; write one with
`python -m dimsum_jax.evaluate.inception --convert=IN.pth --out=OUT.npz` for hosts without
torch). `variables_from_state_dict` checks every key and shape against this network (BatchNorm's
`num_batches_tracked` counters are ignored) and refuses a file of another network in one sentence
that names the keys. Conv weights go [out, in, kh, kw] -> [kh, kw, in, out], fc [out, in] -> [in,
out]; BatchNorm weight/bias are `scale`/`bias` in `params`, running_mean/var `mean`/`var` in
`batch_stats`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax import command_line
from dimsum_jax.data.digits import resize_matrix

NAME = "inception-2015-12-05 (pytorch-fid port)"
SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
DIMS = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "is_logits": NUM_LOGITS, "logits": NUM_LOGITS}
PREPROCESS = ("pytorch_fid", "tf")
WEIGHTS_HINT = (
  "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (from its GitHub release fid_weights)"
)
HIGHEST = jax.lax.Precision.HIGHEST


class WeightsError(ValueError):
  """A weight file that is missing, unreadable or of another network."""


# ------------------------------------------------------------------------------------------------
# Input


def tf1_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of TensorFlow 1's legacy ResizeBilinear (half_pixel_centers=False)."""
  src = np.arange(out_size) * (in_size / out_size)
  lo = np.minimum(np.floor(src).astype(int), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  w = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(w, (rows, lo), 1.0 - frac)
  np.add.at(w, (rows, hi), frac)
  return w


def preprocess(images, mode: str = "pytorch_fid"):
  """uint8 (or float in [0, 255]) [N, H, W, 1 or 3] -> float32 [N, 299, 299, 3] in [-1, 1]."""
  if mode not in PREPROCESS:
    raise ValueError(f"Unknown Inception preprocess {mode!r}; choose one of {PREPROCESS}.")
  x = jnp.asarray(images).astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  h, w = x.shape[1], x.shape[2]
  make = (
    (lambda i: tf1_resize_matrix(i, SIZE))
    if mode == "tf"
    else (lambda i: resize_matrix(i, SIZE, "bilinear"))
  )
  if (h, w) != (SIZE, SIZE):
    wh, ww = (jnp.asarray(make(s), jnp.float32) for s in (h, w))
    x = jnp.einsum("nhwc,xw->nhxc", x, ww, precision=HIGHEST)
    x = jnp.einsum("nhxc,yh->nyxc", x, wh, precision=HIGHEST)
  if mode == "tf":
    return (x - 128.0) / 128.0
  return 2.0 * (x / 255.0) - 1.0


# ------------------------------------------------------------------------------------------------
# The network


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps 0.001, running statistics) -> ReLU."""

  features: int
  kernel_size: Any
  strides: int = 1
  padding: Any = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(
      self.features,
      _pair(self.kernel_size),
      strides=_pair(self.strides),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=HIGHEST,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """3x3 stride-1 average pool, padding 1, the padded zeros left out of the mean (the TF graph;
  the port's patch of torchvision's count_include_pad=True)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride, pad=0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class FIDInceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, 1, name="branch1x1")(x)
    b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
    bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class FIDInceptionC(nn.Module):
  """Returns (block output, the 1x1 branch): the latter of Mixed_6d is `mixed_6/conv`."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name="branch1x1")(x)
    b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class FIDInceptionE(nn.Module):
  """FIDInceptionE_1 (pool="avg", Mixed_7b) and FIDInceptionE_2 (pool="max", Mixed_7c)."""

  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, 1, name="branch1x1")(x)
    b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool(x, 1, pad=1)
    bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The port's fc (2048 -> 1008): (pool @ kernel + bias, pool @ kernel)."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
    bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
    unbiased = jnp.dot(x, kernel, precision=HIGHEST)
    return unbiased + bias, unbiased


class InceptionV3(nn.Module):
  """uint8 images [N, H, W, 1 or 3] -> {pool, logits, is_logits, spatial} (see the docstring)."""

  preprocess: str = "pytorch_fid"

  @nn.compact
  def __call__(self, images):
    x = preprocess(images, self.preprocess)  # [N, 299, 299, 3]
    x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)  # [N, 149, 149, 32]
    x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)  # [N, 147, 147, 32]
    x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)  # [N, 147, 147, 64]
    x = _max_pool(x, 2)  # [N, 73, 73, 64]
    x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)  # [N, 73, 73, 80]
    x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)  # [N, 71, 71, 192]
    x = _max_pool(x, 2)  # [N, 35, 35, 192]
    x = FIDInceptionA(32, name="Mixed_5b")(x)  # [N, 35, 35, 256]
    x = FIDInceptionA(64, name="Mixed_5c")(x)  # [N, 35, 35, 288]
    x = FIDInceptionA(64, name="Mixed_5d")(x)  # [N, 35, 35, 288]
    x = InceptionB(name="Mixed_6a")(x)  # [N, 17, 17, 768]
    x, _ = FIDInceptionC(128, name="Mixed_6b")(x)
    x, _ = FIDInceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = FIDInceptionC(160, name="Mixed_6d")(x)  # mixed_6/conv [N,17,17,192]
    x, _ = FIDInceptionC(192, name="Mixed_6e")(x)  # [N, 17, 17, 768]
    x = InceptionD(name="Mixed_7a")(x)  # [N, 8, 8, 1280]
    x = FIDInceptionE("avg", name="Mixed_7b")(x)  # [N, 8, 8, 2048]
    x = FIDInceptionE("max", name="Mixed_7c")(x)  # [N, 8, 8, 2048]
    pool = jnp.mean(x, axis=(1, 2))  # pool_3 [N, 2048]
    logits, is_logits = Logits(name="fc")(pool)  # [N, 1008] each
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(pool.shape[0], SPATIAL_DIM)
    return {"pool": pool, "logits": logits, "is_logits": is_logits, "spatial": spatial}


def abstract_variables(net: InceptionV3 | None = None):
  """{'params', 'batch_stats'} as ShapeDtypeStructs, without computing anything."""
  net = InceptionV3() if net is None else net
  images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.uint8)
  return jax.eval_shape(net.init, jax.random.key(0), images)


# ------------------------------------------------------------------------------------------------
# The weight file

_BN_LEAVES = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}


def torch_key(collection: str, path: tuple) -> str:
  """('params', ('Mixed_5b', 'branch1x1', 'conv', 'kernel')) -> 'Mixed_5b.branch1x1.conv.weight'."""
  *modules, leaf = path
  if modules[-1] == "bn":
    leaf = {v: k for k, v in _BN_LEAVES.items()}[(collection, leaf)]
  elif leaf == "kernel":
    leaf = "weight"
  return ".".join(list(modules) + [leaf])


def _torch_shape(shape) -> tuple:
  if len(shape) == 4:  # [kh, kw, in, out] -> [out, in, kh, kw]
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def expected_keys(net: InceptionV3 | None = None) -> dict[str, tuple[str, tuple, tuple]]:
  """torch key -> (collection, Flax path, torch shape) of every tensor the file must hold."""
  out = {}
  for collection, tree in abstract_variables(net).items():
    for path, leaf in flax.traverse_util.flatten_dict(tree).items():
      out[torch_key(collection, path)] = (collection, path, _torch_shape(leaf.shape))
  return out


def _first(names, n=3):
  names = sorted(names)
  more = f" and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def variables_from_state_dict(
  state_dict, *, source: str = "the weight file", net: InceptionV3 | None = None
) -> dict:
  """The Flax variables of `net` from the port's state dict (numpy or torch tensors).

  WeightsError, one sentence, when a key is missing, unexpected or of another shape;
  `*.num_batches_tracked` entries are ignored.
  """
  if not hasattr(state_dict, "items"):
    raise WeightsError(
      f"{source} holds a {type(state_dict).__name__}, not a state dict of "
      f"tensors: pass {WEIGHTS_HINT}."
    )
  want = expected_keys(net)
  have = {k: v for k, v in state_dict.items() if not str(k).endswith(".num_batches_tracked")}
  missing = set(want) - set(have)
  unexpected = set(have) - set(want)
  shapes = {k: tuple(np.shape(_numpy(v))) for k, v in have.items() if k in want}
  misshapen = [
    f"{k} is {list(s)}, not {list(want[k][2])}"
    for k, s in sorted(shapes.items())
    if s != want[k][2]
  ]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing ({_first(missing)})")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
  if misshapen:
    problems.append(f"{len(misshapen)} of another shape ({_first(misshapen)})")
  if problems:
    raise WeightsError(
      f"{source} is not the FID Inception's weights: of its keys "
      f"{'; '.join(problems)}; pass {WEIGHTS_HINT}."
    )
  flat = {}
  for key, (collection, path, _) in want.items():
    value = np.asarray(_numpy(have[key]), np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    flat[(collection, *path)] = np.ascontiguousarray(value)
  return flax.traverse_util.unflatten_dict(flat)


def _numpy(value):
  if hasattr(value, "detach"):  # a torch tensor
    return value.detach().cpu().numpy()
  return np.asarray(value)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: float32 array} from a .pth (torch, weights_only) or an .npz of the same keys."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightsError(
      f"Inception weights {path} do not exist: download {WEIGHTS_HINT} once and pass its path."
    )
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except Exception as e:  # a damaged zip, a pickled member: numpy raises many kinds
      raise WeightsError(
        f"{path} is not a readable .npz of Inception weights "
        f"({type(e).__name__}): convert the .pth again with `python -m "
        "dimsum_jax.evaluate.inception --convert=IN.pth --out=OUT.npz`."
      ) from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsError(
      f"Reading {path} needs torch: pip install -e \".[torch]\", or convert it "
      "to .npz on a host that has torch (python -m dimsum_jax.evaluate.inception "
      "--convert=IN.pth --out=OUT.npz)."
    ) from e
  try:
    # weights_only: tensors and plain containers; a pickle asking for more is refused unrun.
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(
      f"{path} is not a torch weight file that loads with weights_only=True "
      f"({type(e).__name__}): pass {WEIGHTS_HINT}."
    ) from e
  if not hasattr(obj, "items"):
    raise WeightsError(
      f"{path} holds a {type(obj).__name__}, not a state dict of tensors: pass {WEIGHTS_HINT}."
    )
  return {str(k): (_numpy(v) if hasattr(v, "detach") else v) for k, v in obj.items()}


def load_variables(path: str, net: InceptionV3 | None = None) -> dict:
  """The checked Flax variables of the weight file at `path` (see load_state_dict)."""
  return variables_from_state_dict(load_state_dict(path), source=os.fspath(path), net=net)


FLAGS = flags.FlagValues()  # this command's own (see dimsum_jax.command_line)
flags.DEFINE_string(
  "convert",
  None,
  "pytorch-fid's .pth weight file (pt_inception-2015-12-05-6726825d.pth).",
  flag_values=FLAGS,
)
flags.DEFINE_string("out", None, "The .npz to write (read without torch).", flag_values=FLAGS)
flags.mark_flags_as_required(["convert", "out"], flag_values=FLAGS)


def main(argv) -> int:
  """python -m dimsum_jax.evaluate.inception --convert=IN.pth --out=OUT.npz: the weight file as
  an .npz, for hosts without torch (checked first)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = command_line.values(FLAGS)
  try:
    state = load_state_dict(args.convert)
    variables_from_state_dict(state, source=args.convert)
  except WeightsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  state = {k: np.asarray(v) for k, v in state.items() if not k.endswith(".num_batches_tracked")}
  tmp = f"{args.out}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **state)
  os.replace(tmp, args.out)
  print(f"Wrote {len(state)} tensors to {args.out}.")
  return 0


def cli():
  """python -m dimsum_jax.evaluate.inception."""
  command_line.run(main, FLAGS)


if __name__ == "__main__":
  cli()
