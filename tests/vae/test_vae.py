"""The Flax AutoencoderKL against diffusers, and the weight import.

The parity tests and the full-size sd-vae-ft-ema mapping test need `torch` and `diffusers` (and
`safetensors`); they fail, not skip, when these are missing. The tiny mapping and error tests need
neither.
"""

import importlib
import json

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import command_line
from dimsum_jax.vae import checkpoint, convert, model

PARITY_PACKAGES = "pip install torch==2.13.0 diffusers==0.42.1 safetensors==0.8.0"
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)


def _require(name):
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ImportError(f"The VAE parity tests need `{name}`: {PARITY_PACKAGES}") from e


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


# -- parity with diffusers (torch) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
  """A small random diffusers AutoencoderKL, saved as safetensors; (torch module, folder)."""
  torch = _require("torch")
  _require("safetensors")
  diffusers = _require("diffusers")
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **SMALL
  ).eval()
  with torch.no_grad():  # group norms start at (1, 0): move them so the mapping is tested
    for name, p in vae.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  assert any("attentions.0.to_q" in name for name, _ in vae.named_parameters())
  folder = tmp_path_factory.mktemp("diffusers_vae")
  vae.save_pretrained(folder, safe_serialization=True)
  return vae, folder


@pytest.fixture(scope="module")
def converted(diffusers_vae, tmp_path_factory):
  """The CLI's output folder for the small diffusers VAE."""
  _, folder = diffusers_vae
  out = tmp_path_factory.mktemp("converted")
  command_line.call(convert, [f"--diffusers={folder}", f"--out={out}", "--overwrite"])
  return out


def test_encoder_moments_match_diffusers(diffusers_vae, converted):
  torch = _require("torch")
  torch_vae, _ = diffusers_vae
  vae, params = checkpoint.load_vae(converted)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = torch_vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
  mean, logvar = jax.jit(model.encode, static_argnums=0)(vae, params, images)
  assert mean.shape == (2, 8, 12, 4) and mean.dtype == jnp.float32
  assert _relative_error(mean, posterior.mean.numpy().transpose(0, 2, 3, 1)) < 1e-4
  assert _relative_error(logvar, posterior.logvar.numpy().transpose(0, 2, 3, 1)) < 1e-4


def test_decoder_matches_diffusers(diffusers_vae, converted):
  torch = _require("torch")
  torch_vae, _ = diffusers_vae
  vae, params = checkpoint.load_vae(converted)
  latents = np.random.default_rng(1).standard_normal((2, 8, 12, 4)).astype(np.float32)
  with torch.no_grad():
    expected = torch_vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
  images = jax.jit(vae.apply, static_argnames="method")(
    {"params": params}, latents, method=model.AutoencoderKL.decode
  )
  assert images.shape == (2, 16, 24, 3)
  assert _relative_error(images, expected.numpy().transpose(0, 2, 3, 1)) < 1e-4


def test_old_attention_names_in_a_torch_bin_give_the_same_params(diffusers_vae, tmp_path):
  torch = _require("torch")
  torch_vae, folder = diffusers_vae
  old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for key, value in torch_vae.state_dict().items():
    for new, old in old_names.items():
      if f".attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        value = value[:, :, None, None] if value.ndim == 2 else value  # stored as 1x1 convs
    state[key] = value.clone()
  torch.save(state, tmp_path / convert.TORCH_FILE)
  (tmp_path / convert.CONFIG_FILE).write_text((folder / convert.CONFIG_FILE).read_text())
  _, from_bin = convert.convert_diffusers_vae(str(tmp_path))
  _, from_safetensors = convert.convert_diffusers_vae(str(folder))
  jax.tree.map(np.testing.assert_array_equal, from_bin, from_safetensors)


# -- the full-size sd-vae-ft-ema architecture, without weights -----------------------------------

# stabilityai/sd-vae-ft-ema's published config.json (its non-architecture fields left out).
SD_VAE_FT_EMA = {
  "_class_name": "AutoencoderKL",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D"] * 4,
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 256,
  "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_VAE_FT_EMA_PARAMETERS = 83_653_863


def _flax_path(diffusers_key, ndim):
  """Where a diffusers key should land, written from the documented naming (not convert.py):
  `.N` joins its module name as `_N`; weights are `kernel` (conv, dense) or `scale` (norm)."""
  *modules, leaf = diffusers_key.split(".")
  path = []
  for name in modules:
    if name.isdigit():
      path[-1] = f"{path[-1]}_{name}"
    else:
      path.append(name)
  if leaf == "weight":
    leaf = "scale" if ndim == 1 else "kernel"
  return tuple(path) + (leaf,)


def _flax_shape(torch_shape):
  """Conv [out, in, kh, kw] -> [kh, kw, in, out]; dense [out, in] -> [in, out]; 1-D kept."""
  if len(torch_shape) == 4:
    out, cin, kh, kw = torch_shape
    return (kh, kw, cin, out)
  return tuple(reversed(torch_shape))


def test_sd_vae_ft_ema_state_dict_maps_key_for_key_onto_the_flax_tree():
  """The real architecture, built by diffusers on the meta device (no weights allocated), against
  the module the project builds from the same config.json: every key has its place, every shape
  its transpose, 83,653,863 parameters on both sides. The conversion itself runs on zero-stride
  NumPy views tagged per key (value 1024 (k + 1) + o along the torch output axis o), so it moves
  no data yet shows which key reached which leaf and that the output axis came out last."""
  torch = _require("torch")
  diffusers = _require("diffusers")
  with torch.device("meta"):
    torch_vae = diffusers.AutoencoderKL(
      **{k: v for k, v in SD_VAE_FT_EMA.items() if not k.startswith("_")}
    )
  shapes = {k: tuple(v.shape) for k, v in torch_vae.state_dict().items()}
  assert sum(p.numel() for p in torch_vae.parameters()) == SD_VAE_FT_EMA_PARAMETERS
  assert sum(int(np.prod(s)) for s in shapes.values()) == SD_VAE_FT_EMA_PARAMETERS  # no buffers

  vae = model.vae_from_config(SD_VAE_FT_EMA)
  assert vae == model.AutoencoderKL()  # the module's defaults are this VAE
  assert vae.downsampling_factor == 8
  abstract = flax.traverse_util.flatten_dict(model.abstract_params(vae))
  assert sum(int(np.prod(a.shape)) for a in abstract.values()) == SD_VAE_FT_EMA_PARAMETERS
  expected = {_flax_path(k, len(s)): _flax_shape(s) for k, s in shapes.items()}
  assert len(expected) == len(shapes)
  assert sorted(expected) == sorted(abstract)
  assert {p: tuple(a.shape) for p, a in abstract.items()} == expected

  tags = {}
  for k, (key, shape) in enumerate(shapes.items()):
    tags[key] = np.broadcast_to(
      (1024 * (k + 1) + np.arange(shape[0], dtype=np.float32)).reshape(
        (-1,) + (1,) * (len(shape) - 1)
      ),
      shape,
    )
  params = flax.traverse_util.flatten_dict(convert.params_from_state_dict(tags, vae))
  assert sorted(params) == sorted(abstract)
  for k, (key, shape) in enumerate(shapes.items()):
    leaf = params[_flax_path(key, len(shape))]
    assert leaf.shape == expected[_flax_path(key, len(shape))], key
    along_out = leaf[(0,) * (leaf.ndim - 1)]  # the last axis, the others at 0
    np.testing.assert_array_equal(along_out, 1024 * (k + 1) + np.arange(shape[0]), err_msg=key)


# -- the mapping on a hand-built NumPy state dict (no torch) -------------------------------------

TINY = dict(
  block_out_channels=[8, 16],
  layers_per_block=1,
  norm_num_groups=4,
  latent_channels=2,
  down_block_types=["DownEncoderBlock2D"] * 2,
  up_block_types=["UpDecoderBlock2D"] * 2,
)


def _tiny_state_dict(old_attention_names=False):
  rng = np.random.default_rng(0)
  state = {}

  def add(key, *shape):
    state[key] = rng.standard_normal(shape).astype(np.float32)

  def conv(prefix, cin, cout, k=3):
    add(f"{prefix}.weight", cout, cin, k, k)
    add(f"{prefix}.bias", cout)

  def norm(prefix, c):
    add(f"{prefix}.weight", c)
    add(f"{prefix}.bias", c)

  def resnet(prefix, cin, cout):
    norm(f"{prefix}.norm1", cin)
    conv(f"{prefix}.conv1", cin, cout)
    norm(f"{prefix}.norm2", cout)
    conv(f"{prefix}.conv2", cout, cout)
    if cin != cout:
      conv(f"{prefix}.conv_shortcut", cin, cout, k=1)

  def mid_block(prefix, c):
    resnet(f"{prefix}.resnets.0", c, c)
    resnet(f"{prefix}.resnets.1", c, c)
    norm(f"{prefix}.attentions.0.group_norm", c)
    names = (
      ("query", "key", "value", "proj_attn")
      if old_attention_names
      else ("to_q", "to_k", "to_v", "to_out.0")
    )
    for name in names:
      shape = (c, c, 1, 1) if old_attention_names else (c, c)
      add(f"{prefix}.attentions.0.{name}.weight", *shape)
      add(f"{prefix}.attentions.0.{name}.bias", c)

  conv("encoder.conv_in", 3, 8)
  resnet("encoder.down_blocks.0.resnets.0", 8, 8)
  conv("encoder.down_blocks.0.downsamplers.0.conv", 8, 8)
  resnet("encoder.down_blocks.1.resnets.0", 8, 16)
  mid_block("encoder.mid_block", 16)
  norm("encoder.conv_norm_out", 16)
  conv("encoder.conv_out", 16, 4)
  conv("quant_conv", 4, 4, k=1)
  conv("post_quant_conv", 2, 2, k=1)
  conv("decoder.conv_in", 2, 16)
  mid_block("decoder.mid_block", 16)
  resnet("decoder.up_blocks.0.resnets.0", 16, 16)
  resnet("decoder.up_blocks.0.resnets.1", 16, 16)
  conv("decoder.up_blocks.0.upsamplers.0.conv", 16, 16)
  resnet("decoder.up_blocks.1.resnets.0", 16, 8)
  resnet("decoder.up_blocks.1.resnets.1", 8, 8)
  norm("decoder.conv_norm_out", 8)
  conv("decoder.conv_out", 8, 3)
  return state


@pytest.fixture(scope="module")
def tiny_vae():
  return model.vae_from_config(TINY)


def test_tiny_state_dict_maps_to_flax_layout(tiny_vae):
  state = _tiny_state_dict()
  params = convert.params_from_state_dict(state, tiny_vae)
  shapes = jax.tree.map(lambda x: x.shape, model.abstract_params(tiny_vae))
  assert jax.tree.map(np.shape, params) == shapes
  encoder = params["encoder"]
  np.testing.assert_array_equal(
    encoder["conv_in"]["kernel"], state["encoder.conv_in.weight"].transpose(2, 3, 1, 0)
  )
  shortcut = encoder["down_blocks_1"]["resnets_0"]["conv_shortcut"]["kernel"]
  np.testing.assert_array_equal(
    shortcut[0, 0], state["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"][:, :, 0, 0].T
  )
  np.testing.assert_array_equal(
    encoder["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
    state["encoder.mid_block.attentions.0.to_out.0.weight"].T,
  )
  np.testing.assert_array_equal(
    params["decoder"]["up_blocks_0"]["upsamplers_0"]["conv"]["bias"],
    state["decoder.up_blocks.0.upsamplers.0.conv.bias"],
  )
  np.testing.assert_array_equal(
    params["decoder"]["conv_norm_out"]["scale"], state["decoder.conv_norm_out.weight"]
  )


def test_old_attention_names_map_like_new_ones(tiny_vae):
  old = _tiny_state_dict(old_attention_names=True)
  new = {}
  for key, value in convert.rename_old_attention_keys(old).items():
    new[key] = value[:, :, 0, 0] if value.ndim == 4 and ".attentions." in key else value
  jax.tree.map(
    np.testing.assert_array_equal,
    convert.params_from_state_dict(old, tiny_vae),
    convert.params_from_state_dict(new, tiny_vae),
  )


def test_tiny_vae_helpers_are_jittable_and_consistent(tiny_vae):
  params = convert.params_from_state_dict(_tiny_state_dict(), tiny_vae)
  images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  rng = jax.random.key(0)

  @jax.jit  # one program: XLA shares the encoder between the three encodes
  def helpers(params, images, rng):
    mean, logvar = model.encode(tiny_vae, params, images)
    latents = model.images_to_latents(tiny_vae, params, images)
    sampled = model.images_to_latents(tiny_vae, params, images, rng)
    return (
      mean,
      logvar,
      latents,
      sampled,
      model.latents_to_images(tiny_vae, params, latents),
      model.decode_latents(tiny_vae, params, latents),
    )

  mean, logvar, latents, sampled, decoded, pixels = helpers(params, images, rng)
  assert latents.shape == (2, 4, 4, 2) and decoded.shape == images.shape
  assert bool(jnp.all(jnp.isfinite(decoded)))
  assert float(logvar.min()) >= -30 and float(logvar.max()) <= 20
  np.testing.assert_allclose(latents, mean * model.SCALING_FACTOR, rtol=1e-6)
  noise = jax.random.normal(rng, mean.shape)
  np.testing.assert_allclose(
    sampled, (mean + jnp.exp(0.5 * logvar) * noise) * model.SCALING_FACTOR, rtol=1e-5, atol=1e-6
  )
  assert float(jnp.abs(sampled - latents).max()) > 0
  # decode_latents: upstream's uint8 conversion of the decoded images, float64 reference.
  want = np.floor(np.clip(127.5 * np.asarray(decoded, np.float64) + 128.0, 0, 255))
  assert pixels.shape == images.shape and pixels.dtype == jnp.uint8
  assert np.abs(np.asarray(pixels, np.int64) - want).max() <= 1  # float32 vs float64 rounding
  assert np.mean(np.asarray(pixels) == want) > 0.99

  bf16 = model.vae_from_config(TINY, dtype=jnp.bfloat16)
  mean_bf16, _ = jax.jit(model.encode, static_argnums=0)(bf16, params, images)
  assert mean_bf16.dtype == jnp.float32 and _relative_error(mean_bf16, mean) < 5e-2


def test_save_and_load_round_trip(tiny_vae, tmp_path):
  params = convert.params_from_state_dict(_tiny_state_dict(), tiny_vae)
  checkpoint.save_vae(str(tmp_path), TINY, params)
  vae, restored = checkpoint.load_vae(str(tmp_path), dtype="bfloat16")
  assert vae.dtype == jnp.bfloat16 and vae.block_out_channels == (8, 16)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  replicated = jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)), jax.P())
  _, placed = checkpoint.load_vae(str(tmp_path), sharding=replicated)
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(placed))
  with pytest.raises(FileExistsError, match="--overwrite"):
    checkpoint.save_vae(str(tmp_path), TINY, params)


# -- error messages ------------------------------------------------------------------------------


def test_missing_unexpected_and_misshapen_keys_are_named(tiny_vae):
  state = _tiny_state_dict()
  del state["decoder.conv_out.bias"]
  state["decoder.extra.weight"] = np.zeros(3, np.float32)
  state["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
  with pytest.raises(ValueError) as error:
    convert.params_from_state_dict(state, tiny_vae, source="DIR")
  message = str(error.value)
  assert message.startswith("DIR does not match the AutoencoderKL")
  assert "missing keys decoder.conv_out.bias" in message
  assert "unexpected keys decoder.extra.weight" in message
  assert "encoder.conv_in.weight (got (8, 3, 5, 5), expected (8, 3, 3, 3))" in message


def test_another_architecture_is_refused():
  with pytest.raises(ValueError, match="down_block_types"):
    model.vae_from_config(dict(TINY, down_block_types=["CrossAttnDownBlock2D"] * 2))
  with pytest.raises(ValueError, match="'UNet2DConditionModel'"):
    model.vae_from_config(dict(TINY, _class_name="UNet2DConditionModel"))


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    convert.find_vae_folder(str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    convert.find_vae_folder(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(TINY))
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors or"):
    convert.find_vae_folder(str(tmp_path))
  with pytest.raises(SystemExit, match="has no weights"):
    command_line.call(convert, [f"--diffusers={tmp_path}", f"--out={tmp_path / 'out'}"])
  with pytest.raises(FileNotFoundError, match="dimsum_jax.vae.convert"):
    checkpoint.load_vae(str(tmp_path / "never_converted"))


def test_pipeline_folder_with_vae_subfolder_is_found(tmp_path):
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(json.dumps(TINY))
  (tmp_path / "vae" / convert.SAFETENSORS_FILE).write_bytes(b"")
  assert convert.find_vae_folder(str(tmp_path)) == str(tmp_path / "vae")


# -- the convert CLI on folders written by diffusers' save_pretrained -----------------------------


def test_cli_converts_a_torch_bin_folder_like_safetensors(diffusers_vae, converted, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  torch_vae, _ = diffusers_vae
  folder = tmp_path / "bin"
  torch_vae.save_pretrained(folder, safe_serialization=False)
  assert (folder / convert.TORCH_FILE).exists() and not (folder / convert.SAFETENSORS_FILE).exists()
  out = tmp_path / "out"
  result = subprocess.run(
    [sys.executable, "-m", "dimsum_jax.vae.convert", f"--diffusers={folder}", f"--out={out}"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  count = sum(p.numel() for p in torch_vae.parameters())
  assert f"Wrote {count:,} VAE parameters" in result.stdout
  _, from_bin = checkpoint.load_vae(str(out))
  _, from_safetensors = checkpoint.load_vae(str(converted))
  jax.tree.map(np.testing.assert_array_equal, from_bin, from_safetensors)


def _cli_error(args):
  with pytest.raises(SystemExit) as error:
    command_line.call(convert, args)
  message = str(error.value)
  assert message.startswith("error: ") and "\n" not in message
  return message


def test_cli_refuses_another_architecture_in_one_sentence(diffusers_vae, tmp_path):
  torch = _require("torch")
  diffusers = _require("diffusers")
  torch.manual_seed(0)
  unet = diffusers.UNet2DModel(
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    down_block_types=("DownBlock2D",) * 2,
    up_block_types=("UpBlock2D",) * 2,
  )
  unet.save_pretrained(tmp_path / "unet")
  message = _cli_error([f"--diffusers={tmp_path / 'unet'}", f"--out={tmp_path / 'o1'}"])
  assert "_class_name is 'UNet2DModel', not 'AutoencoderKL'" in message

  # An AutoencoderKL config.json beside the weights of another AutoencoderKL.
  _, folder = diffusers_vae
  other = tmp_path / "mixed"
  other.mkdir()
  (other / convert.SAFETENSORS_FILE).write_bytes((folder / convert.SAFETENSORS_FILE).read_bytes())
  config = json.loads((folder / convert.CONFIG_FILE).read_text())
  (other / convert.CONFIG_FILE).write_text(json.dumps(dict(config, layers_per_block=2)))
  message = _cli_error([f"--diffusers={other}", f"--out={tmp_path / 'o2'}"])
  assert "does not match the AutoencoderKL its config.json describes (missing keys" in message
  assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_load_vae_refuses_params_of_another_shape(tiny_vae, tmp_path):
  params = convert.params_from_state_dict(_tiny_state_dict(), tiny_vae)
  checkpoint.save_vae(str(tmp_path), TINY, params)
  (tmp_path / "config.json").write_text(json.dumps(dict(TINY, block_out_channels=[8, 32])))
  with pytest.raises(
    ValueError,
    match=r"are not those of the VAE its config.json describes "
    r"\(decoder/conv_in/bias is stored \(16,\) but config.json needs \(32,\)",
  ):
    checkpoint.load_vae(str(tmp_path))


# -- decoding to pixels ---------------------------------------------------------------------------


def test_to_uint8_is_upstreams_clamp_and_truncation():
  x = np.asarray([-1.5, -1.0, -0.0039, 0.0, 0.5, 0.99, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(model.to_uint8(x), [0, 0, 127, 128, 191, 254, 255, 255])
  assert model.to_uint8(x).dtype == jnp.uint8
