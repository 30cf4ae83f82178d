"""Hugging Face model directories: config.json, safetensors weights (plain or block-FP8).

`load(path)` reads a Llama-family, Gemma 3 or DeepSeek-V3 directory into the reference
transformer's params (store/hf/load.py); `save(...)` writes one (store/hf/save.py);
`resolve_init_from` and `init_params` start a training run from one (store/hf/init.py);
`config` maps config.json to `ModelConfig` and back; `tensors` reads and writes
safetensors files.
"""

from store.hf.config import SUPPORTED, HFError, to_model_config
from store.hf.init import init_params, resolve_init_from
from store.hf.load import HFModel, is_hf_dir, load, read_config

__all__ = ["SUPPORTED", "HFError", "HFModel", "init_params", "is_hf_dir", "load", "read_config",
           "resolve_init_from",
           "to_model_config"]
