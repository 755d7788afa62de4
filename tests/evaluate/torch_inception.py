"""pytorch-fid's FID Inception in plain PyTorch: the reference the Flax network is checked against.

pytorch-fid (src/pytorch_fid/inception.py) cannot be installed beside CPU torch here (it imports
torchvision, whose index wheels are CUDA builds), so this file rebuilds the network it computes,
module for module, from the two sources it is made of:

  - torchvision.models.inception: BasicConv2d (conv without bias, BatchNorm2d(eps=0.001), ReLU),
    InceptionB, InceptionD, the base InceptionA/C/E branch layouts, Inception3's stem, its
    AdaptiveAvgPool2d and fc (2048 -> num_classes);
  - pytorch-fid: `fid_inception_v3()` (Inception3 with num_classes=1008, aux_logits=False, and
    Mixed_5b..5d = FIDInceptionA, 6b..6e = FIDInceptionC, 7b = FIDInceptionE_1, 7c =
    FIDInceptionE_2), whose forwards replace the average pools by count_include_pad=False ones
    and 7c's by a 3x3/1 max pool; and `InceptionV3.forward`'s input handling: bilinear
    F.interpolate to 299 (align_corners=False), then 2x - 1 on inputs in [0, 1].

The module names are the port's, so `state_dict()` has the released file's keys and shapes
(`release_keys` lists them; BatchNorm adds its `num_batches_tracked` counters, which the file of
a modern torch carries too). `random_state_dict(seed)` fills it with seeded random weights whose
activations stay O(1) through the 94 convolutions. `features(model, images01)` returns what the
Flax network returns: pool_3, the fc logits with and without the bias (ADM's Inception Score
drops it), and Mixed_6d.branch1x1's first 7 channels flattened in NHWC order.
"""

import torch
from torch import nn
import torch.nn.functional as F


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_tf(x))
    return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
  def __init__(self, cin, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (
      self.branch7x7dbl_2,
      self.branch7x7dbl_3,
      self.branch7x7dbl_4,
      self.branch7x7dbl_5,
    ):
      bd = layer(bd)
    bp = self.branch_pool(_avg_pool_tf(x))
    return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
  """FIDInceptionE_1 (max_pool=False) and FIDInceptionE_2 (max_pool=True)."""

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.max_pool:
      pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
      pooled = _avg_pool_tf(x)
    return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInception3(nn.Module):
  """torchvision's Inception3(num_classes=1008, aux_logits=False) with pytorch-fid's blocks."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, pool_features=32)
    self.Mixed_5c = FIDInceptionA(256, pool_features=64)
    self.Mixed_5d = FIDInceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)


def features(model, images01):
  """{pool, logits, is_logits, spatial} of float images in [0, 1], NCHW, as pytorch-fid feeds."""
  spatial = {}
  hook = model.Mixed_6d.branch1x1.register_forward_hook(
    lambda module, inputs, output: spatial.update(x=output)
  )
  try:
    with torch.no_grad():
      x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
      x = 2 * x - 1
      for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = getattr(model, name)(x)
      x = F.max_pool2d(x, kernel_size=3, stride=2)
      x = model.Conv2d_4a_3x3(model.Conv2d_3b_1x1(x))
      x = F.max_pool2d(x, kernel_size=3, stride=2)
      for name in (
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
        "Mixed_6a",
        "Mixed_6b",
        "Mixed_6c",
        "Mixed_6d",
        "Mixed_6e",
        "Mixed_7a",
        "Mixed_7b",
        "Mixed_7c",
      ):
        x = getattr(model, name)(x)
      pool = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
      logits = model.fc(pool)
      is_logits = pool @ model.fc.weight.T
  finally:
    hook.remove()
  s = spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(pool.shape[0], -1)  # NHWC order
  return {"pool": pool, "logits": logits, "is_logits": is_logits, "spatial": s}


def random_state_dict(model, seed):
  """Seeded random weights, scaled so that activations neither vanish nor explode.

  Conv weights N(0, 2 / fan_in) (He), BatchNorm weight U(0.8, 1.2), bias U(-0.1, 0.1), running
  mean U(-0.1, 0.1), running var U(0.5, 1.5); fc N(0, 1 / 2048), bias U(-0.1, 0.1).
  """
  g = torch.Generator().manual_seed(seed)
  state = {}
  for key, value in model.state_dict().items():
    shape = value.shape
    if key.endswith("num_batches_tracked"):
      state[key] = torch.tensor(0, dtype=torch.long)
    elif key.endswith("conv.weight"):
      fan_in = shape[1] * shape[2] * shape[3]
      state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    elif key == "fc.weight":
      state[key] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    elif key.endswith("running_var"):
      state[key] = 0.5 + torch.rand(shape, generator=g)
    elif key.endswith("bn.weight"):
      state[key] = 0.8 + 0.4 * torch.rand(shape, generator=g)
    else:  # bn.bias, running_mean, fc.bias
      state[key] = 0.2 * torch.rand(shape, generator=g) - 0.1
  model.load_state_dict(state)
  return state
