"""A GGUF file's tokenizer, rebuilt from its metadata as a `tokenizers.Tokenizer`.

    tok = model_tokenizer("model.gguf")          # a store.tokenizer.ModelTokenizer
    files = tokenizer_files("model.gguf")        # tokenizer.json, tokenizer_config.json, ... for export

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (tokenizer.ggml.tokens,
.scores, .token_type, .merges), the special token ids, add_bos_token/add_eos_token and
the chat template as metadata. The pipeline built here is the one transformers builds
when it loads a tokenizer with `gguf_file=` (its GGUF tokenizer builders and the
LlamaTokenizer, GemmaTokenizer and GPT2Tokenizer they hand the vocabulary to), so the
ids are the same:

* "llama" (SentencePiece BPE): byte-fallback BPE over the tokens; merges recovered from
  the vocabulary, best score first; Metaspace pre-tokenizer (prefix "▁" on the first
  word). Gemma files respell all-space tokens as "▁"s, order merges by token position
  and replace " " with "▁" in a normalizer instead.
* "gpt2" (byte-level BPE): the file's merges; the pre-tokenizer's split regex chosen by
  tokenizer.ggml.pre (llama3, qwen2, ...), else GPT-2's ByteLevel.
* control tokens (token_type 3) and the bos/eos/unk/pad tokens are special added
  tokens, user-defined ones (4) plain added tokens; a post-processor adds BOS/EOS as
  add_bos_token/add_eos_token say (a "llama" vocabulary adds BOS unless told not to).
"""

from __future__ import annotations

from pathlib import Path

from store import tokenizer as tokenizer_lib
from store.gguf.reader import GGUFError, GGUFFile

MODELS = ("llama", "gpt2")
CONTROL, USER_DEFINED = 3, 4
_GEMMA = ("gemma", "gemma2", "gemma3")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regex its merges were learned with.
SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                           "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
          **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
          "qwen35": _QWEN35_SPLIT, "tekken": _TEKKEN_SPLIT,
          **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT)}
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}
# Ids that end a turn besides EOS (Gemma's <end_of_turn>, Llama 3's <|eot_id|>).
_STOP_IDS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def _tokens(file: GGUFFile) -> list[str]:
    """tokenizer.ggml.tokens, checked present along with a supported tokenizer.ggml.model.

    Raises:
      GGUFError: no tokenizer metadata, or a tokenizer model mpx does not build.
    """
    model = file.get("tokenizer.ggml.model")
    tokens = file.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
        raise GGUFError(f"{file.path}: no tokenizer in the metadata ({missing} missing); "
                        f"mpx builds the tokenizer from tokenizer.ggml.* metadata")
    if model not in MODELS:
        raise GGUFError(f"{file.path}: unsupported tokenizer.ggml.model {model!r}; supported: {', '.join(MODELS)}")
    return list(tokens)


def has_tokenizer(file: GGUFFile) -> bool:
    return file.has("tokenizer.ggml.model") and file.has("tokenizer.ggml.tokens")


def recovered_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a scored vocabulary implies (what transformers' generate_merges gives):
    every split of a token into two tokens, ranked by the whole token's score (best first),
    ties by the pieces' lengths, longer first, then in vocabulary order."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece(file: GGUFFile, tokens: list[str]):
    import tokenizers
    from tokenizers import decoders, normalizers, pre_tokenizers

    gemma = file.architecture in _GEMMA
    if gemma:
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = dict(zip(tokens, file.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in file.get("tokenizer.ggml.merges")] \
        if file.has("tokenizer.ggml.merges") else recovered_merges(vocab, scores)
    unk = "<unk>" if gemma and "<unk>" in vocab else None
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                                     unk_token=unk))
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return tok


def _byte_level(file: GGUFFile, tokens: list[str]):
    import tokenizers
    from tokenizers import Regex, decoders, pre_tokenizers

    spelling = tokenizer_lib.bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    if file.has("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ")) for m in file.get("tokenizer.ggml.merges")]
    else:
        merges = recovered_merges(vocab, dict(zip(vocab, file.get("tokenizer.ggml.scores") or [0.0] * len(vocab))))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                                     end_of_word_suffix="", fuse_unk=False))
    split = SPLITS.get(file.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def special_tokens(file: GGUFFile) -> dict[str, str]:
    """{"bos_token": "<s>", ...}: the tokens the file's special ids name."""
    tokens = _tokens(file)
    out = {}
    for name, key in _SPECIAL_IDS.items():
        i = file.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= int(i) < len(tokens):
            out[name] = tokens[int(i)]
    return out


def adds(file: GGUFFile) -> tuple[bool, bool]:
    """(add_bos_token, add_eos_token): the file's flags; a "llama" vocabulary that says
    nothing adds BOS (as llama.cpp does)."""
    default_bos = file.get("tokenizer.ggml.model") == "llama"
    return bool(file.get("tokenizer.ggml.add_bos_token", default_bos)), \
        bool(file.get("tokenizer.ggml.add_eos_token", False))


def build(file: GGUFFile):
    """The `tokenizers.Tokenizer` of a GGUF file's metadata.

    Raises:
      GGUFError: no tokenizer metadata, or an unsupported tokenizer model.
    """
    from tokenizers import AddedToken, processors

    tokens = _tokens(file)
    byte_level = file.get("tokenizer.ggml.model") == "gpt2"
    tok = (_byte_level if byte_level else _sentencepiece)(file, tokens)
    alphabet = set(tokenizer_lib.bytes_to_unicode().values())
    types = list(file.get("tokenizer.ggml.token_type") or [])
    specials = dict.fromkeys(special_tokens(file).values())
    specials.update(dict.fromkeys(t for t, k in zip(tokens, types)
                                  if k == CONTROL and (not byte_level or set(t) <= alphabet)))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    named = special_tokens(file)
    add_bos, add_eos = adds(file)
    bos, eos = (named.get("bos_token") if add_bos else None), (named.get("eos_token") if add_eos else None)
    single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
    pair = " ".join([single] + [f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t])
    return tok


def stop_ids(file: GGUFFile) -> list[int]:
    """Ids that end generation: EOS, and end-of-turn/message ids where the file names them."""
    return list(dict.fromkeys(int(file.get(k)) for k in _STOP_IDS if file.get(k) is not None))


def tokenizer_config(file: GGUFFile) -> dict:
    """tokenizer_config.json of the file: special tokens, add_bos/add_eos, chat template.

    Raises:
      GGUFError: no tokenizer metadata.
    """
    add_bos, add_eos = adds(file)
    out = {**special_tokens(file), "add_bos_token": add_bos, "add_eos_token": add_eos,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    if file.get("tokenizer.chat_template"):
        out["chat_template"] = file.get("tokenizer.chat_template")
    return out


def generation_config(file: GGUFFile) -> dict:
    """generation_config.json of the file: bos_token_id and the stop ids as eos_token_id."""
    out = {}
    if file.get("tokenizer.ggml.bos_token_id") is not None:
        out["bos_token_id"] = int(file.get("tokenizer.ggml.bos_token_id"))
    stops = stop_ids(file)
    if stops:
        out["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    return out


def model_tokenizer(path: str | Path):
    """The `store.tokenizer.ModelTokenizer` of a GGUF file (special tokens, stop ids, chat template).

    Raises:
      GGUFError: an unreadable file, no tokenizer metadata, an unsupported tokenizer model.
    """
    from store import gguf as gguf_lib
    from store.tokenizer import ModelTokenizer

    file = gguf_lib.open_file(path)
    return ModelTokenizer(build(file), tokenizer_config(file), generation_config(file))


def tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """{name: bytes} of a Hugging Face tokenizer for the GGUF file (tokenizer.json,
    tokenizer_config.json, generation_config.json), for export."""
    import json

    from store import gguf as gguf_lib

    file = gguf_lib.open_file(path)
    return {"tokenizer.json": build(file).to_str().encode(),
            "tokenizer_config.json": json.dumps(tokenizer_config(file), indent=2).encode(),
            "generation_config.json": json.dumps(generation_config(file), indent=2).encode()}
