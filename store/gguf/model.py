"""A GGUF file as what the Hugging Face reader consumes: config.json keys and HF-named tensors.

    cfg = hf_config(GGUFFile(path))        # {"architectures": ["LlamaForCausalLM"], "hidden_size": ..., ...}
    tensors = Tensors(GGUFFile(path))      # names(), info(name), tensor(name) under Hugging Face names

so `store.hf.config.to_model_config` and `store.hf.load.load_params` read a GGUF file
exactly as they read a model directory, with every architecture they support. The
mapping follows llama.cpp's writer (convert_hf_to_gguf.py) and transformers' GGUF
loader:

* metadata `{arch}.embedding_length`, `.block_count`, `.attention.head_count`, ...
  become hidden_size, num_hidden_layers, num_attention_heads, ...; the vocabulary size
  is `{arch}.vocab_size` or the number of tokenizer.ggml.tokens; the embedding is tied
  when the file has no output.weight.
* llama.cpp permutes the rows of llama's (and mistral's) Q and K projections for its
  interleaved RoPE; `unpermute` undoes it (transformers' reverse_permute_weights).
* Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w, transformers' weight
  is w, so Gemma 3 norms come back less 1.
* mistral: `{arch}.attention.sliding_window`, else transformers' MistralConfig default (4096).
"""

from __future__ import annotations

import re

import numpy as np

from store.gguf.reader import GGUFError, GGUFFile

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# Architectures whose Q/K rows llama.cpp permutes (LlamaModel.modify_tensors in convert_hf_to_gguf.py).
_PERMUTED = ("llama", "mistral")
MISTRAL_SLIDING_WINDOW = 4096  # transformers' MistralConfig default, used when the file names none
# {arch}.<key> -> config.json key.
_CONFIG_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
                "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
                "rope.freq_base": "rope_theta", "attention.head_count": "num_attention_heads",
                "attention.head_count_kv": "num_key_value_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
                "attention.key_length": "head_dim", "vocab_size": "vocab_size"}
_REQUIRED = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
_TOKEN_IDS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
              "tokenizer.ggml.padding_token_id": "pad_token_id"}

# GGUF block tensor -> Hugging Face name under model.layers.{i}.
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GEMMA_LAYER = {**_LAYER, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def architecture(file: GGUFFile) -> str:
    """The file's general.architecture, checked to be one mpx reads.

    Raises:
      GGUFError: none named, or an unsupported one (naming the supported ones).
    """
    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{file.path}: unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    return arch


def hf_name(arch: str, name: str) -> str:
    """The Hugging Face name of GGUF tensor `name` (unknown names come back unchanged)."""
    if name in _TOP:
        return _TOP[name]
    match = _BLOCK.match(name)
    layer = _GEMMA_LAYER if arch == "gemma3" else _LAYER
    if match and match.group(2) in layer:
        return f"model.layers.{match.group(1)}.{layer[match.group(2)]}.{match.group(3)}"
    return name


def hf_config(file: GGUFFile) -> dict:
    """config.json (Hugging Face keys) of a GGUF file's metadata.

    Raises:
      GGUFError: an unsupported architecture, or a required size missing from the metadata.
    """
    arch = architecture(file)
    missing = [f"{arch}.{k}" for k in _REQUIRED if not file.has(f"{arch}.{k}")]
    if missing:
        raise GGUFError(f"{file.path}: the metadata lacks {', '.join(missing)}")
    cfg = {"architectures": [ARCHITECTURES[arch]], "model_type": "gemma3_text" if arch == "gemma3" else arch}
    cfg.update({hf: file.get(f"{arch}.{key}") for key, hf in _CONFIG_KEYS.items() if file.has(f"{arch}.{key}")})
    cfg.update({hf: file.get(key) for key, hf in _TOKEN_IDS.items() if file.has(key)})
    if "vocab_size" not in cfg:
        cfg["vocab_size"] = len(file.get("tokenizer.ggml.tokens") or []) or file.shape("token_embd.weight")[0]
    cfg["tie_word_embeddings"] = "output.weight" not in file.names()
    if file.get(f"{arch}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": file.get(f"{arch}.rope.scaling.factor", 1.0)}
    if arch == "mistral":
        cfg["sliding_window"] = file.get(f"{arch}.attention.sliding_window", MISTRAL_SLIDING_WINDOW)
    if arch == "gemma3":
        cfg.update(_gemma3(file, cfg))
    return cfg


def _gemma3(file: GGUFFile, cfg: dict) -> dict:
    """Gemma 3's extra config.json keys (what transformers' Gemma3TextConfig needs).

    Sizes that are not positive integers are passed on as they are, so that
    `store.hf.config.to_model_config` names them (a head count of 0 is not divided by).
    """
    sizes = [cfg.get(k) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
        return {}
    head_dim = cfg.get("head_dim") or sizes[0] // sizes[1]
    window = file.get("gemma3.attention.sliding_window")
    # llama.cpp's Gemma 3: every 6th layer global; local layers use RoPE base 10000.
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(sizes[2])]
    return {"head_dim": head_dim, "sliding_window": window, "layer_types": types, "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": head_dim, "hidden_activation": "gelu_pytorch_tanh",
            "rope_theta": cfg.get("rope_theta", 1000000.0), "final_logit_softcapping": None,
            "attn_logit_softcapping": None}


def unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (rows grouped per head as (2, half) ->
    (half, 2)); the inverse of convert_hf_to_gguf.py's LlamaModel.permute."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class Tensors:
    """A GGUF file's tensors under Hugging Face names, as store.hf.load reads safetensors:
    `names()`, `info(name)` -> ("F32", shape), `tensor(name)` -> float32 array in HF layout."""

    def __init__(self, file: GGUFFile, cfg: dict | None = None):
        self.file = file
        self.arch = architecture(file)
        self.cfg = cfg or hf_config(file)
        self._gguf = {hf_name(self.arch, n): n for n in file.names()}

    def names(self) -> list[str]:
        return list(self._gguf)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """("F32", shape) of a tensor: every readable type dequantizes to float32.

        Raises:
          GGUFError: a tensor type mpx cannot dequantize.
        """
        self.file.check_type(self._gguf[name])
        return "F32", self.file.shape(self._gguf[name])

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` dequantized to float32, as transformers holds it."""
        value = self.file.dequantize(self._gguf[name])
        if self.arch in _PERMUTED and ".self_attn.q_proj." in name:
            value = unpermute(value, self.cfg["num_attention_heads"])
        elif self.arch in _PERMUTED and ".self_attn.k_proj." in name:
            value = unpermute(value, self.cfg.get("num_key_value_heads") or self.cfg["num_attention_heads"])
        elif self.arch == "gemma3" and name.endswith("norm.weight"):
            value = value - 1.0
        return value
