"""Every command line turns a missing config file, a missing input and a corrupt input into one
sentence on stderr and exit status 1, never a traceback; and every one refuses a misspelt flag the
same way (absl's sentence naming the flag and the one meant), before it does anything.

Each case runs the real `python -m ...` process on CPU (tests/train_util.run_python) and asserts
exit status 1, no "Traceback" on stderr, and a last stderr line that names the file and says what
to do. The processes stop before any compilation, so each case takes a few seconds.
(dimsum_jax.tools.hashfill takes no files and has no command line; dimsum_jax.sample's files are
tested in tests/test_sample_cli.py.)
"""

import os

import numpy as np
import pytest

from tests import train_util
from tests.data.test_encode import make_vae_dir
from tests.golden import golden_file

SYNTAX_ERROR = "def get_config(:\n  return None\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Missing and corrupt inputs of every kind the command lines read."""
  root = tmp_path_factory.mktemp("cli_errors")
  f = {"root": root, "missing": root / "missing"}
  f["bad_config"] = root / "bad_config.py"
  f["bad_config"].write_text(SYNTAX_ERROR)
  f["junk"] = root / "junk.bin"
  f["junk"].write_bytes(b"\x00\x01 this is not what it claims to be \xff" * 8)
  # A golden file cut in half: a zip whose directory is gone.
  data = golden_file("tiny.npz").read_bytes()
  f["truncated_npz"] = root / "truncated.npz"
  f["truncated_npz"].write_bytes(data[: len(data) // 2])
  # A training workdir whose config.json is damaged, and one without config.json.
  f["bad_workdir"] = root / "bad_workdir"
  f["bad_workdir"].mkdir()
  (f["bad_workdir"] / "config.json").write_text('{"model": {"name": ')
  f["empty_workdir"] = root / "empty_workdir"
  f["empty_workdir"].mkdir()
  # Diffusers VAE folders: without config.json, with a damaged one, with damaged weights.
  for name, config, weights in (
    ("vae_no_config", None, ("diffusion_pytorch_model.safetensors", b"")),
    ("vae_bad_config", "{not json", ("diffusion_pytorch_model.safetensors", b"")),
    ("vae_bad_safetensors", "{}", ("diffusion_pytorch_model.safetensors", b"\x08junk")),
    ("vae_bad_bin", "{}", ("diffusion_pytorch_model.bin", b"junk" * 10)),
  ):
    folder = root / name
    folder.mkdir()
    if config is not None:
      (folder / "config.json").write_text(config)
    (folder / weights[0]).write_bytes(weights[1])
    f[name] = folder
  # Converted VAEs: a tiny good one, and one whose config.json is damaged.
  make_vae_dir(root / "vae", seed=0)
  f["vae"] = root / "vae"
  f["vae_damaged"] = root / "vae_damaged"
  (f["vae_damaged"] / "params").mkdir(parents=True)
  (f["vae_damaged"] / "config.json").write_text("{\"_class_name\": ")
  # An image folder with an image that does not decode.
  f["images"] = root / "images"
  f["images"].mkdir()
  (f["images"] / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  return f


def _main(f, out, *extra):
  return ["-m", "dimsum_jax.main", f"--workdir={out}", *extra]


def _encode(out, vae, data_dir):
  return [
    "-m",
    "dimsum_jax.data.encode",
    "--dataset=image_folder",
    f"--vae={vae}",
    f"--data_dir={data_dir}",
    f"--out={out}",
    "--image_size=16",
    "--process_index=0",
    "--process_count=1",
  ]


# (id, argv of the process from the files and its output path, the file that the sentence names,
# the fix that it gives).
CASES = [
  # python -m dimsum_jax.main: its config file, and the VAE a config names.
  (
    "main-missing-config",
    lambda f, o: _main(f, o, "--config=configs/missing.py"),
    lambda f: "configs/missing.py",
    "pass a config file",
  ),
  (
    "main-corrupt-config",
    lambda f, o: _main(f, o, f"--config={f['bad_config']}"),
    lambda f: f["bad_config"],
    "fix the file",
  ),
  (
    "main-missing-input",
    lambda f, o: _main(
      f, o, "--config=configs/digits.py:smoke", f"--config.vae.dir={f['missing']}"
    ),
    lambda f: f["missing"] / "config.json",
    "convert the diffusers VAE first",
  ),
  (
    "main-corrupt-input",
    lambda f, o: _main(
      f, o, "--config=configs/digits.py:smoke", f"--config.vae.dir={f['vae_damaged']}"
    ),
    lambda f: f["vae_damaged"] / "config.json",
    "convert the VAE again",
  ),
  # python -m dimsum_jax.tools.flops: its config file (it reads no other file).
  (
    "flops-missing-config",
    lambda f, o: ["-m", "dimsum_jax.tools.flops", "--config=configs/missing.py"],
    lambda f: "configs/missing.py",
    "pass a config file",
  ),
  (
    "flops-corrupt-config",
    lambda f, o: ["-m", "dimsum_jax.tools.flops", f"--config={f['bad_config']}"],
    lambda f: f["bad_config"],
    "fix the file",
  ),
  # python -m dimsum_jax.export: the run's config.json in --workdir.
  (
    "export-missing-config",
    lambda f, o: ["-m", "dimsum_jax.export", f"--workdir={f['empty_workdir']}", f"--out={o}"],
    lambda f: f["empty_workdir"],
    "pass the --workdir of a training run",
  ),
  (
    "export-missing-input",
    lambda f, o: ["-m", "dimsum_jax.export", f"--workdir={f['missing']}", f"--out={o}"],
    lambda f: f["missing"],
    "pass the --workdir of a training run",
  ),
  (
    "export-corrupt-input",
    lambda f, o: ["-m", "dimsum_jax.export", f"--workdir={f['bad_workdir']}", f"--out={o}"],
    lambda f: f["bad_workdir"] / "config.json",
    "restore the config.json",
  ),
  # python -m dimsum_jax.convert: --config and the upstream checkpoint.
  (
    "convert-missing-config",
    lambda f, o: [
      "-m",
      "dimsum_jax.convert",
      f"--upstream={f['junk']}",
      "--config=configs/missing.py",
      f"--out={o}",
    ],
    lambda f: "configs/missing.py",
    "pass a config file",
  ),
  (
    "convert-corrupt-config",
    lambda f, o: [
      "-m",
      "dimsum_jax.convert",
      f"--upstream={f['junk']}",
      f"--config={f['bad_config']}",
      f"--out={o}",
    ],
    lambda f: f["bad_config"],
    "fix the file",
  ),
  (
    "convert-missing-input",
    lambda f, o: ["-m", "dimsum_jax.convert", f"--upstream={f['missing']}.pt", f"--out={o}"],
    lambda f: f"{f['missing']}.pt",
    "pass the path of an upstream .pt checkpoint",
  ),
  (
    "convert-corrupt-input",
    lambda f, o: ["-m", "dimsum_jax.convert", f"--upstream={f['junk']}", f"--out={o}"],
    lambda f: f["junk"],
    "download it again",
  ),
  # python -m dimsum_jax.vae.convert: the diffusers folder, its config.json and weights.
  (
    "vae-missing-input",
    lambda f, o: ["-m", "dimsum_jax.vae.convert", f"--diffusers={f['missing']}", f"--out={o}"],
    lambda f: f["missing"],
    "pass --diffusers=DIR",
  ),
  (
    "vae-missing-config",
    lambda f, o: [
      "-m",
      "dimsum_jax.vae.convert",
      f"--diffusers={f['vae_no_config']}",
      f"--out={o}",
    ],
    lambda f: f["vae_no_config"],
    "download the whole diffusers VAE folder",
  ),
  (
    "vae-corrupt-config",
    lambda f, o: [
      "-m",
      "dimsum_jax.vae.convert",
      f"--diffusers={f['vae_bad_config']}",
      f"--out={o}",
    ],
    lambda f: f["vae_bad_config"] / "config.json",
    "download it again",
  ),
  (
    "vae-corrupt-safetensors",
    lambda f, o: [
      "-m",
      "dimsum_jax.vae.convert",
      f"--diffusers={f['vae_bad_safetensors']}",
      f"--out={o}",
    ],
    lambda f: f["vae_bad_safetensors"] / "diffusion_pytorch_model.safetensors",
    "download it again",
  ),
  (
    "vae-corrupt-bin",
    lambda f, o: ["-m", "dimsum_jax.vae.convert", f"--diffusers={f['vae_bad_bin']}", f"--out={o}"],
    lambda f: f["vae_bad_bin"] / "diffusion_pytorch_model.bin",
    "download it again",
  ),
  # python -m dimsum_jax.data.encode: the converted VAE and the image folder.
  (
    "encode-missing-config",
    lambda f, o: _encode(o, f["missing"], f["images"]),
    lambda f: f["missing"] / "config.json",
    "convert the diffusers VAE first",
  ),
  (
    "encode-corrupt-config",
    lambda f, o: _encode(o, f["vae_damaged"], f["images"]),
    lambda f: f["vae_damaged"] / "config.json",
    "convert the VAE again",
  ),
  (
    "encode-missing-input",
    lambda f, o: _encode(o, f["vae"], f["missing"]),
    lambda f: f["missing"],
    "point --data_dir at",
  ),
  (
    "encode-corrupt-input",
    lambda f, o: _encode(o, f["vae"], f["images"]),
    lambda f: f["images"] / "0.png",
    "--on_bad_image=skip",
  ),
  # python -m dimsum_jax.tools.parity: the golden file.
  (
    "parity-missing-input",
    lambda f, o: ["-m", "dimsum_jax.tools.parity", f"--golden={f['missing']}.npz"],
    lambda f: f"{f['missing']}.npz",
    "pass a golden .npz file",
  ),
  (
    "parity-corrupt-input",
    lambda f, o: ["-m", "dimsum_jax.tools.parity", f"--golden={f['junk']}"],
    lambda f: f["junk"],
    "write the golden file with numpy.savez",
  ),
  (
    "parity-corrupt-truncated",
    lambda f, o: ["-m", "dimsum_jax.tools.parity", f"--golden={f['truncated_npz']}"],
    lambda f: f["truncated_npz"],
    "write it again with numpy.savez",
  ),
]


# The encoder records its settings in OUT before it decodes the first image (to resume exactly).
WRITES_BEFORE_FAILING = {"encode-corrupt-input"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_sentence_and_exit_status_1(files, tmp_path, case):
  case_id, argv, named, fix = case
  out = tmp_path / "out"
  r = train_util.run_python(argv(files, out), timeout=120)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert str(named(files)) in last, last
  assert fix in last, last
  assert last.startswith("error: "), last
  if case_id not in WRITES_BEFORE_FAILING:
    assert not out.exists(), f"{case_id} wrote {out}"


def test_parity_golden_without_config_json_is_one_sentence(tmp_path):
  """A readable golden file that lacks what the tool needs: one sentence, exit status 1."""
  data = dict(np.load(golden_file("tiny.npz"), allow_pickle=False))
  del data["config_json"]
  path = tmp_path / "noconfig.npz"
  np.savez(path, **data)
  r = train_util.run_python(["-m", "dimsum_jax.tools.parity", f"--golden={path}"], timeout=120)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines() == [
    f"error: {path} has no `config_json`: a golden file must carry upstream's "
    "hyperparameters (see the format of tiny.npz)."
  ]


def test_every_cli_with_file_inputs_is_covered():
  """Each command line has a missing-file case and a corrupt-file case."""
  kinds = {}
  for case_id, *_ in CASES:
    cli, kind = case_id.split("-", 1)
    kinds.setdefault(cli, set()).add(kind.split("-")[0])
  assert set(kinds) == {"main", "flops", "export", "convert", "vae", "encode", "parity"}
  for cli, seen in kinds.items():
    assert seen == {"missing", "corrupt"}, cli


# A misspelt flag on every command line (argv of the process from the files and its output path,
# the flag as typed, the flag absl suggests): absl refuses it before anything runs.
UNKNOWN_FLAGS = [
  (
    lambda f, o: _main(f, o, "--config=configs/digits.py:smoke", "--work_dir=x"),
    "work_dir",
    "workdir",
  ),
  (
    lambda f, o: [
      "-m",
      "dimsum_jax.sample",
      f"--checkpoint={f['missing']}",
      f"--out={o}",
      "--num_sample=4",
    ],
    "num_sample",
    "num_samples",
  ),
  (
    lambda f, o: [
      "-m",
      "dimsum_jax.export",
      f"--workdir={f['empty_workdir']}",
      f"--out={o}",
      "--stepp=1",
    ],
    "stepp",
    "step",
  ),
  (
    lambda f, o: [
      "-m",
      "dimsum_jax.tools.flops",
      "--config=configs/digits.py:smoke",
      "--hiden_size=8",
    ],
    "hiden_size",
    "hidden_size",
  ),
  (
    lambda f, o: ["-m", "dimsum_jax.convert", f"--upstrem={f['junk']}", f"--out={o}"],
    "upstrem",
    "upstream",
  ),
  (
    lambda f, o: [
      "-m",
      "dimsum_jax.vae.convert",
      f"--diffusers={f['missing']}",
      f"--out={o}",
      "--overwrit",
    ],
    "overwrit",
    "overwrite",
  ),
  (
    lambda f, o: _encode(o, f["vae"], f["images"]) + ["--image_sise=16"],
    "image_sise",
    "image_size",
  ),
  (
    lambda f, o: ["-m", "dimsum_jax.tools.parity", f"--golden={f['missing']}.npz", "--float_64"],
    "float_64",
    "float64",
  ),
  (
    lambda f, o: [
      "-m",
      "dimsum_jax.evaluate",
      f"--samples={f['missing']}.npz",
      f"--out={o}",
      "--refrence=x.npz",
    ],
    "refrence",
    "reference",
  ),
  (
    lambda f, o: [
      "-m",
      "dimsum_jax.evaluate.reference",
      "--dataset=digits",
      f"--out={o}",
      "--num_image=5",
    ],
    "num_image",
    "num_images",
  ),
  (
    lambda f, o: [
      "-m",
      "dimsum_jax.evaluate.sweep",
      f"--checkpoint={f['missing']}",
      f"--out={o}",
      "--cfg_scales=1,2",
    ],
    "cfg_scales",
    "cfg_scale",
  ),
  (
    lambda f, o: ["-m", "dimsum_jax.evaluate.inception", f"--convrt={f['junk']}", f"--out={o}"],
    "convrt",
    "convert",
  ),
]


def _module(case):
  argv = case[0](
    {"missing": "m", "junk": "j", "empty_workdir": "e", "vae": "v", "images": "i"}, "o"
  )
  return argv[argv.index("-m") + 1]


@pytest.mark.parametrize("case", UNKNOWN_FLAGS, ids=_module)
def test_an_unknown_flag_is_named_in_one_sentence(files, tmp_path, case):
  """absl's refusal, the same for every command: exit status 1, no traceback, one sentence that
  names the flag and the one meant, then absl's pointer to --helpshort; nothing written."""
  argv, typed, meant = case
  out = tmp_path / "out"
  r = train_util.run_python(argv(files, out), timeout=120)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-2:] == [
    f"FATAL Flags parsing error: Unknown command line flag '{typed}'. Did you mean: {meant} ?",
    "Pass --helpshort or --helpfull to see help on flags.",
  ], r.stderr[-3000:]
  assert not out.exists()


def test_every_command_line_has_an_unknown_flag_case():
  """Every module with a cli() (the console scripts and the python -m commands) is covered."""
  root = os.path.join(train_util.ROOT, "dimsum_jax")
  modules = set()
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      if name.endswith(".py") and "\ndef cli(" in open(path).read():
        rel = os.path.relpath(path, train_util.ROOT)[:-3].replace(os.sep, ".")
        modules.add({"dimsum_jax.evaluate.command": "dimsum_jax.evaluate"}.get(rel, rel))
  assert modules == {_module(case) for case in UNKNOWN_FLAGS}
