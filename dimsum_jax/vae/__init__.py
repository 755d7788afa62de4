"""The Stable Diffusion VAE (sd-vae-ft-ema) in Flax, and its import from diffusers.

vae, params = load_vae(directory)                     # from python -m dimsum_jax.vae.convert
latents = images_to_latents(vae, params, images, rng)  # [-1, 1] images -> scaled latents
images = latents_to_images(vae, params, latents)      # scaled latents -> float images
pixels = decode_latents(vae, params, latents)         # scaled latents -> uint8, as upstream saves
"""

from dimsum_jax.vae.checkpoint import load_vae, save_vae
from dimsum_jax.vae.model import (
  SCALING_FACTOR,
  AutoencoderKL,
  abstract_params,
  batch_encoder,
  decode_latents,
  encode,
  images_to_latents,
  latents_to_images,
  to_uint8,
  vae_from_config,
)

__all__ = [
  'SCALING_FACTOR',
  'AutoencoderKL',
  'abstract_params',
  'batch_encoder',
  'decode_latents',
  'encode',
  'images_to_latents',
  'latents_to_images',
  'load_vae',
  'save_vae',
  'to_uint8',
  'vae_from_config',
]
