"""Hugging Face model directories: config.json, safetensors weights (plain or block-FP8).

`load(path)` reads a Llama-family directory into the reference transformer's params
(store/hf/load.py); `save(...)` writes one (store/hf/save.py); `config` maps config.json
to `ModelConfig` and back; `tensors` reads and writes safetensors files.
"""

from store.hf.config import SUPPORTED, HFError, to_model_config
from store.hf.load import HFModel, is_hf_dir, load

__all__ = ["SUPPORTED", "HFError", "HFModel", "is_hf_dir", "load", "to_model_config"]
