"""Where the golden data of the official PyTorch DiMSUM lives: `shared/golden/` beside the repo."""

import json
import pathlib

GOLDEN = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def golden_file(name: str) -> pathlib.Path:
  path = GOLDEN / name
  if not path.exists():
    raise FileNotFoundError(
      f"Golden file {path} is missing: the parity tests need the golden data of the official "
      "implementation in shared/golden/ next to the repository checkout."
    )
  return path


def manifest() -> dict:
  with open(golden_file("manifest.json")) as f:
    return json.load(f)
