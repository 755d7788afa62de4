"""Square crops of decoded images, NumPy + PIL (shared by the image folder and the tfds readers).

`adm_center_crop` is guided-diffusion's center_crop_arr (used for ImageNet by ADM, DiT, SiT and
DiMSUM's latent extraction): halve with a BOX filter while the short side is >= 2 * size, BICUBIC
resize so the short side is `size` (each side rounded), then take the centre (offsets floored).
`resize_center_crop` is torchvision's Resize(size) + CenterCrop(size) on a PIL image (BILINEAR, the
long side truncated, offsets rounded half to even): DiMSUM's transform for LSUN and CelebA-HQ.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _to_pil(array: np.ndarray) -> Image.Image:
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"Crops take uint8 images, got {array.dtype}.")
  if array.ndim == 3 and array.shape[-1] == 1:
    return Image.fromarray(array[..., 0])
  return Image.fromarray(array)


def _from_pil(image: Image.Image, like: np.ndarray) -> np.ndarray:
  out = np.asarray(image)
  return out[..., None] if np.ndim(like) == 3 and out.ndim == 2 else out


def adm_center_crop_pil(image: Image.Image, size: int) -> np.ndarray:
  while min(*image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(*image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  array = np.asarray(image)
  top = (array.shape[0] - size) // 2
  left = (array.shape[1] - size) // 2
  return array[top : top + size, left : left + size]


def resize_center_crop_pil(image: Image.Image, size: int) -> np.ndarray:
  w, h = image.size
  if w <= h:
    new = (size, int(size * h / w))
  else:
    new = (int(size * w / h), size)
  if new != (w, h):
    image = image.resize(new, resample=Image.BILINEAR)
  array = np.asarray(image)
  top = int(round((array.shape[0] - size) / 2.0))
  left = int(round((array.shape[1] - size) / 2.0))
  return array[top : top + size, left : left + size]


def adm_center_crop(array: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W] or [H, W, C] -> uint8 [size, size(, C)], guided-diffusion's center_crop_arr."""
  return _from_pil(adm_center_crop_pil(_to_pil(array), size), array)


def resize_center_crop(array: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W(, C)] -> [size, size(, C)], torchvision Resize(size) + CenterCrop(size)."""
  return _from_pil(resize_center_crop_pil(_to_pil(array), size), array)


def crop_pil(image: Image.Image, size: int, method: str) -> np.ndarray:
  """A decoded PIL image -> uint8 [size, size, C] by `method` ('adm', 'resize_center', 'none')."""
  if method == "adm":
    out = adm_center_crop_pil(image, size)
  elif method == "resize_center":
    out = resize_center_crop_pil(image, size)
  elif method == "none":
    out = np.asarray(image)
    if out.shape[:2] != (size, size):
      raise ValueError(
        f"crop='none' needs {size}x{size} images, got {out.shape[1]}x{out.shape[0]}."
      )
  else:
    raise ValueError(f"Unknown crop {method!r}.")
  return out[..., None] if out.ndim == 2 else out


def crop_array(array: np.ndarray, size: int, method: str) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [size, size, C] by `method`."""
  return crop_pil(_to_pil(array), size, method)


def to_unit_range(array: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (x / 127.5 - 1, torchvision's Normalize(0.5, 0.5))."""
  return array.astype(np.float32) / 127.5 - 1.0
