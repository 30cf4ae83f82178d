"""Serving latency and throughput under load: time to first token, inter-token latency,
total tokens/s, for 1, 4, 16 ... concurrent streaming clients.

    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --clients 1,4,16 --requests 32
    python -m benchmarks.serve_load --checkpoint runs/tiny --precisions fp8,bf16,fp32 \\
        --save benchmarks/results/serve_load.txt

With `--url` (repeatable) it loads servers that already run. With `--checkpoint` it
starts `python -m serve.server` once per precision on a free loopback port and stops
them at the end. Only loopback addresses are accepted. The servers are measured
round-robin (every level of every server once per repeat; only one is loaded at a time,
the others idle), so a machine whose load drifts treats them alike.

Per concurrency level c: c clients, each sending streamed /v1/completions requests (the
same prompt, greedy, `--max-tokens` new tokens) one after another until `--requests`
have completed, after one unmeasured warm-up request. Reported per level, over all
repeats:

* TTFT p50 / p99: from sending a request to its first content chunk, in ms;
* ITL p50 / p99: gaps between consecutive content chunks of a stream, in ms (a chunk
  is one decode step's token unless text is held back, e.g. inside a UTF-8 character);
* tok/s: completion tokens of all requests (from the usage chunk) / the level's wall
  time, the median over repeats;
* scale: tok/s relative to the 1-client level of the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import numpy as np

import benchmarks
from store import cli

PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S = 600
PRECISIONS = ("fp8", "bf16", "fp32")


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _one(client: httpx.AsyncClient, url: str, max_tokens: int) -> dict:
    """One streamed request: its TTFT, chunk gaps and completion tokens."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, stamps, tokens, prompt = time.perf_counter(), [], 0, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens, prompt = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - sent if stamps else float("nan"), "gaps": list(np.diff(stamps)), "tokens": tokens,
            "prompt": prompt}


async def _level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` streamed requests from `clients` concurrent clients: raw samples."""
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await _one(client, url, max_tokens)  # warm-up: connections and server paths
        remaining, results = [requests], []

        async def worker():
            while remaining[0] > 0:
                remaining[0] -= 1
                results.append(await _one(client, url, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"ttft": [r["ttft"] * 1e3 for r in results], "gaps": [g * 1e3 for r in results for g in r["gaps"]],
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "requests": len(results),
            "prompt_tokens": results[0]["prompt"]}


def summarize(samples: list[dict], clients: int) -> dict:
    """One level's repeats: TTFT and ITL percentiles over all of them, median tok/s."""
    ttft = [t for s in samples for t in s["ttft"]]
    gaps = [g for s in samples for g in s["gaps"]]
    return {"clients": clients, "requests": sum(s["requests"] for s in samples),
            "prompt_tokens": samples[0]["prompt_tokens"],
            "ttft_p50_ms": _percentile(ttft, 50), "ttft_p99_ms": _percentile(ttft, 99),
            "itl_p50_ms": _percentile(gaps, 50), "itl_p99_ms": _percentile(gaps, 99),
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in samples)}


def measure(urls: list[str], levels: list[int], requests: int, max_tokens: int, repeats: int) -> list[dict]:
    """Every level against every server, round-robin (each server once per level per
    repeat) so that a machine whose load drifts treats them alike."""
    samples = {(u, c): [] for u in urls for c in levels}
    for _ in range(repeats):
        for c in levels:
            for u in urls:
                samples[u, c].append(asyncio.run(_level(u, c, max(requests, c), max_tokens)))
    results = []
    for u in urls:
        health = httpx.get(f"{u}/health", timeout=30).json()
        rows = [summarize(samples[u, c], c) for c in levels]
        for row in rows:
            row["scale"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        results.append({"url": u, "precision": health.get("precision", "?"), "kv_cache": health.get("kv_cache", "?"),
                        "rows": rows})
    return results


# --------------------------------------------------------------------------- servers


def start_server(checkpoint: str, precision: str | None, max_batch: int | None,
                 extra: list[str]) -> tuple[subprocess.Popen, str]:
    """Starts `python -m serve.server` on a free loopback port (its own default precision
    and slots where None); returns it and its URL."""
    cmd = [sys.executable, "-m", "serve.server", "--checkpoint", checkpoint, "--port", "0"]
    cmd += ["--precision", precision] if precision else []
    cmd += ["--max-batch", str(max_batch)] if max_batch else []
    cmd += extra
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + START_TIMEOUT_S
    for line in proc.stdout:
        if line.startswith("serving on "):
            return proc, line.split()[-1]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(cli.fail(f"the {precision or 'default'} server did not start (exit status {proc.wait()})"))


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- report


def report(results: list[dict], args) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    prompt = results[0]["rows"][0]["prompt_tokens"] if results else 0
    lines = [f"Serving load: {prompt}-token prompt, {args.max_tokens} new tokens per request (greedy), "
             f"{args.requests} requests per level x {args.repeats} round-robin repeats; {os.cpu_count()} CPUs, "
             f"load average {load:.1f} at the end",
             f"{'weights':<28}{'clients':>8}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}{'tok/s':>9}"
             f"{'scale':>7}"]
    for res in results:
        for row in res["rows"]:
            lines.append(f"{res['precision']:<28}{row['clients']:>8}{row['ttft_p50_ms']:>10.1f}"
                         f"{row['ttft_p99_ms']:>8.1f}{row['itl_p50_ms']:>9.2f}{row['itl_p99_ms']:>8.2f}"
                         f"{row['tokens_per_s']:>9,.0f}{row['scale']:>7.2f}")
    lines.append("(ms; tok/s: completion tokens of all clients per second; scale: vs 1 client)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmarks.parser("serve_load", __doc__)
    p.add_argument("--url", action="append", default=[], help="a running server (repeatable)")
    p.add_argument("--checkpoint", help="start one server per --precisions on this checkpoint")
    p.add_argument("--precisions", default="fp8,bf16,fp32")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=cli.positive_int, default=32, help="requests per level (at least the clients)")
    p.add_argument("--max-tokens", type=cli.positive_int, default=64)
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="round-robin repeats of every level and server")
    p.add_argument("--server-arg", action="append", default=[], help="extra serve.server option (repeatable)")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.checkpoint):
        p.error("give --url (one or more) or --checkpoint")
    try:
        args.levels = [cli.positive_int(c) for c in args.clients.split(",")]
    except argparse.ArgumentTypeError as err:
        p.error(f"argument --clients: {err}")
    bad = [x for x in args.precisions.split(",") if x not in PRECISIONS]
    if bad:
        p.error(f"argument --precisions: unknown precision {bad[0]!r}; allowed: {', '.join(PRECISIONS)}")
    for url in args.url:
        if urllib.parse.urlparse(url).hostname not in LOOPBACK:
            p.error(f"argument --url: must be a loopback address ({', '.join(LOOPBACK)}); got {url!r}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    urls, procs = [u.rstrip("/") for u in args.url], []
    try:
        for precision in (args.precisions.split(",") if args.checkpoint else []):
            proc, url = start_server(args.checkpoint, precision, max(args.levels), args.server_arg)
            procs.append(proc)
            urls.append(url)
        results = measure(urls, args.levels, args.requests, args.max_tokens, args.repeats)
    finally:
        for proc in procs:
            stop_server(proc)
    return benchmarks.report(args, report(results, args), {"results": results})


if __name__ == "__main__":
    main()
