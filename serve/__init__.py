"""Serving: quantize a training checkpoint (quantize), generate with a KV cache (engine,
kv_cache, sampling) and measure what precision costs (evaluate); CLIs in generate.py
and evaluate.py."""
