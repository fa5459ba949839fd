"""Turn the user's `--model` argument into an HF model folder the loader can read."""
from __future__ import annotations

from pathlib import Path

from llmserve.errors import ModelLoadError
from llmserve.model.default_model import default_model_path
from llmserve.model.gguf_loader import gguf_to_hf_folder

_GGUF_MAGIC = b"GGUF"


def resolve_model_folder(model: str | Path | None) -> Path:
    """None -> the default model; a GGUF file -> its converted folder; an HF folder -> itself."""
    if model is None:
        return gguf_to_hf_folder(default_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder has no config.json: {path}")
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return gguf_to_hf_folder(path)
        raise ModelLoadError(f"model path is neither a GGUF file nor a model folder: {path}")
    raise ModelLoadError(f"model path not found (llmserve loads local GGUF files and HF folders only): {path}")


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False
