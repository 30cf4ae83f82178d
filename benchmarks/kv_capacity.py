"""KV cache capacity: decode speed with a 4096-slot vs a 256-slot cache, and the server's default flags.

The model has SmolLM-135M's shape (vocab 49152, d_model 576, 30 layers, 9 heads, 3 key/value
heads, d_ff 1536, tied embeddings), randomly initialized: speed does not depend on what
the weights learned.

Part 1, `serve.engine` (what `serve.generate` runs): a 150-token sequence (a 22-token
prompt and 128 new tokens), 1 and 8 rows, fp32 weights and a bf16 KV cache of 4096 and
of 256 slots per row. Engines are warmed up and measured round-robin (every case once per
repeat), medians reported. Decode attends over the filled part of the cache (`span`),
so the two capacities should decode at the same speed; `total` is all rows' new tokens
per second of prefill + decode, and `x batch 1` the batch-8 total over the batch-1 one.

Part 2, `serve.server` with its default flags (fp8 weights, bf16 KV cache, slots and
context from the model and the machine) on the same shape with a 256-token vocabulary
(an mpx checkpoint serves with the byte-level tokenizer), saved as a checkpoint: one
non-streamed greedy request of 32 new tokens (84-token prompt), after one warm-up
request, median over `--requests`, against `serve.engine` generating the same tokens
with the same precision in this process (`serve.generate`'s path), warm.

    python -m benchmarks.kv_capacity --save benchmarks/results/kv_capacity.txt
    python -m benchmarks.kv_capacity --quick          # 1 repeat, 2 requests
    python -m benchmarks.kv_capacity --part capacity  # part 1 only (--part server: part 2 only)
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp

import benchmarks
from benchmarks import serve_load
from models import transformer
from models.config import ModelConfig
from mpx import config as config_io
from serve import engine as engine_lib
from serve import quantize as q
from store import checkpoint as ckpt_lib

SMOLLM_135M = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                          tie_embeddings=True, embed_scale=False, max_seq_len=4096, rope_theta=10000.0)
CAPACITIES = (4096, 256)
ROWS = (1, 8)
PROMPT_TOKENS, NEW_TOKENS = 22, 128
SERVER_TOKENS = 32


def random_checkpoint(config: ModelConfig) -> q.Checkpoint:
    """A randomly initialized checkpoint of `config` (f32 masters)."""
    model = transformer.Transformer(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return q.Checkpoint(config, params, {}, 0, Path("random-init"))


def prompts(rows: int, length: int) -> list[list[int]]:
    return [[(7 * r + 3 * i) % 256 + 1 for i in range(length)] for r in range(rows)]


def capacity_rates(ckpt: q.Checkpoint, repeats: int) -> dict:
    """Decode and total tokens/s per (capacity, rows), round-robin medians."""
    model, variables = q.prepare(ckpt, q.ServeSpec("fp32"))
    engines = {cap: engine_lib.Engine(model.clone(config=dataclasses.replace(model.config, max_seq_len=cap)),
                                      variables, kv_cache="bf16") for cap in CAPACITIES}
    cases = [(cap, rows) for rows in ROWS for cap in CAPACITIES]
    for cap, rows in cases:
        engines[cap].warm_up(prompts(rows, PROMPT_TOKENS), NEW_TOKENS)
    samples = {case: {"decode": [], "total": []} for case in cases}
    tokens = {}
    for _ in range(repeats):
        for cap, rows in cases:
            outs, stats = engines[cap].generate(prompts(rows, PROMPT_TOKENS), max_new_tokens=NEW_TOKENS)
            samples[cap, rows]["decode"].append(stats.decode_tokens_per_s)
            samples[cap, rows]["total"].append(stats.new_tokens / (stats.prefill_s + stats.decode_s))
            tokens[cap, rows] = [o.tokens for o in outs]
    same = all(tokens[CAPACITIES[0], rows] == tokens[cap, rows] for cap, rows in cases)
    medians = {f"{cap}x{rows}": {k: statistics.median(v) for k, v in s.items()} for (cap, rows), s in samples.items()}
    return {"rates": medians, "same_tokens": same,
            "traces": {cap: dict(e.traces) for cap, e in engines.items()}}


def server_vs_engine(ckpt: q.Checkpoint, requests: int) -> dict:
    """Seconds for one 32-token request: the server with default flags vs the engine."""
    prompt = serve_load.PROMPT
    model, variables = q.prepare(ckpt, q.ServeSpec("fp8"))
    engine = engine_lib.Engine(model, variables, kv_cache="bf16")
    ids = [list(prompt.encode())]
    engine.warm_up(ids, SERVER_TOKENS)
    engine_s = []
    for _ in range(requests):
        start = time.perf_counter()
        engine.generate(ids, max_new_tokens=SERVER_TOKENS)
        engine_s.append(time.perf_counter() - start)
    del engine, variables
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smollm-shape" / "checkpoints"
        ckpt_lib.save(path, 1, {"params": ckpt.params}, {"config": {"model": config_io.to_dict(ckpt.config)}})
        start = time.perf_counter()
        proc, url = serve_load.start_server(str(path), None, None, [])
        startup = time.perf_counter() - start
        try:
            health = httpx.get(f"{url}/health", timeout=30).json()
            body = {"prompt": prompt, "max_tokens": SERVER_TOKENS, "temperature": 0}
            server_s = []
            for i in range(requests + 1):  # the first one warms up connections and paths
                start = time.perf_counter()
                reply = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
                assert reply["usage"]["completion_tokens"] == SERVER_TOKENS, reply
                server_s.append(time.perf_counter() - start)
        finally:
            serve_load.stop_server(proc)
    engine_t, server_t = statistics.median(engine_s), statistics.median(server_s[1:])
    return {"engine_s": engine_t, "server_s": server_t, "ratio": server_t / engine_t, "startup_s": startup,
            "health": health}


def report(args, part1: dict | None, part2: dict | None) -> tuple[str, dict]:
    lines, payload = [], {}
    if part1 is not None:
        lines, payload = _capacity_table(args, part1), dict(part1)
    if part2 is not None:
        h = part2["health"]
        lines += ["", f"One {SERVER_TOKENS}-token request: serve.server with default flags (fp8 weights, "
                  f"{h.get('max_batch')} slots x {h.get('max_seq_len')} positions, started in "
                  f"{part2['startup_s']:.0f} s) vs serve.engine (fp8, warm), median of {args.requests}; "
                  "SmolLM-135M shape with a 256-token vocabulary",
                  f"{'engine s':>10}{'server s':>10}{'server/engine':>15}",
                  f"{part2['engine_s']:>10.2f}{part2['server_s']:>10.2f}{part2['ratio']:>15.2f}"]
        payload["server"] = part2
    return "\n".join(lines), payload


def _capacity_table(args, part1: dict) -> list[str]:
    rates = part1["rates"]
    lines = [f"KV cache capacity on {jax.default_backend()}: SmolLM-135M shape (random init), fp32 weights, bf16 KV "
             f"cache, {PROMPT_TOKENS}-token prompt + {NEW_TOKENS} new tokens, median of {args.repeats} round-robin "
             "repeats",
             f"{'rows':>5}{'decode 4096':>13}{'decode 256':>12}{'4096/256':>10}{'total 4096':>12}{'total 256':>11}"
             f"{'x batch 1':>11}"]
    for rows in ROWS:
        big, small = rates[f"4096x{rows}"], rates[f"256x{rows}"]
        scale = big["total"] / rates["4096x1"]["total"]
        lines.append(f"{rows:>5}{big['decode']:>13.1f}{small['decode']:>12.1f}{big['decode'] / small['decode']:>10.2f}"
                     f"{big['total']:>12.1f}{small['total']:>11.1f}{scale:>11.2f}")
    lines.append(f"(tokens/s, all rows; the same tokens at both capacities: {part1['same_tokens']}; compilations "
                 f"per capacity: {part1['traces']})")
    return lines


def main(argv=None) -> int:
    parser = benchmarks.parser("kv_capacity", __doc__)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 server requests")
    parser.add_argument("--part", choices=("all", "capacity", "server"), default="all",
                        help="part 1 (capacity), part 2 (server) or both")
    args = parser.parse_args(argv)
    args.repeats, args.requests = (1, 2) if args.quick else (3, 5)
    part1 = part2 = None
    if args.part != "server":
        part1 = capacity_rates(random_checkpoint(SMOLLM_135M), args.repeats)
        print("\n".join(_capacity_table(args, part1)), flush=True)  # kept if part 2 fails
    if args.part != "capacity":
        part2 = server_vs_engine(random_checkpoint(dataclasses.replace(SMOLLM_135M, vocab_size=256)), args.requests)
    benchmarks.report(args, *report(args, part1, part2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
