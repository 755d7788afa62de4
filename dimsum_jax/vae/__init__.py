"""The Stable Diffusion VAE (sd-vae-ft-ema) in Flax, and its import from diffusers."""
from dimsum_jax.vae.checkpoint import load_vae, save_vae
from dimsum_jax.vae.model import (SCALING_FACTOR, AutoencoderKL, abstract_params, encode,
                                  images_to_latents, latents_to_images, vae_from_config)
