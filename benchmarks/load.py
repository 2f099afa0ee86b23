"""Load test of a running `tidar serve` (issue 27, item 6): tokens/s, latency, TTFT, failures, exactness.

For each mode (the request field "mode"), each sampling (greedy: temperature 0; sampled:
temperature 0.7, top_p 0.9, no seed: the server decodes a seeded request alone, so that its draws are
reproducible, which is not the load this measures) and each concurrency level C (ascending), it
sends N streaming `/v1/completions` requests with exactly C in flight (fewer only for the last
C-1), prompts cycled from a small built-in list of code and prose. Per level it reports the total
generated tokens/s (sum of `usage.completion_tokens` / the level's wall time), p50/p95 latency
(time to [DONE]), p50/p95 time to the first chunk with text, failures (429s apart from other
errors, by status) and, for greedy levels, how many outputs equal the same prompt's output at
concurrency 1 (exactness under load). Loopback servers only; bounded by --requests per level and
--time-limit overall (no new request starts past it; the run says so and stops).

    # against a running server
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 16
    # start `tidar serve` on a free loopback port, run, stop it (the default without --url)
    .venv/bin/python benchmarks/load.py --threads 2 --concurrency 1,4,16 --requests 16 --sampling greedy \
        --modes tidar,ar --max-tokens 64 --json benchmarks/results/load-2026-12-06.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The history of the printing press begins",
    "import json\n\ndef load_config(path):\n",
    "Once upon a time, in a small village by the sea,",
    "class Stack:\n    def __init__(self):\n",
    "The three most important ideas in thermodynamics are",
    "def is_prime(n: int) -> bool:\n",
    "Photosynthesis is the process by which",
]

SAMPLED = {"temperature": 0.7, "top_p": 0.9}
GREEDY = {"temperature": 0}


def check_loopback(url: str) -> None:
    """Raise ValueError unless `url` is http(s) on a loopback host."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or host not in LOOPBACK:
        raise ValueError(f"refusing {url!r}: the load test only drives servers on loopback "
                         f"(host 127.0.0.1, localhost or ::1)")


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


async def one_request(client: httpx.AsyncClient, body: dict, headers: dict) -> dict:
    """One streaming completion: {status, text, completion_tokens, latency_s, ttft_s, error}."""
    t0 = time.perf_counter()
    out = {"status": None, "text": None, "completion_tokens": None, "latency_s": None, "ttft_s": None, "error": None}
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                out["error"] = str(r.status_code)
                return out
            text, done = [], False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out["error"] = "stream_error"
                    return out
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        if out["ttft_s"] is None:
                            out["ttft_s"] = time.perf_counter() - t0
                        text.append(choice["text"])
                if chunk.get("usage"):
                    out["completion_tokens"] = chunk["usage"]["completion_tokens"]
            if not done:
                out["error"] = "no_done"
                return out
            out["latency_s"] = time.perf_counter() - t0
            out["text"] = "".join(text)
    except httpx.HTTPError as e:
        out["error"] = type(e).__name__
    return out


async def probe_health(client: httpx.AsyncClient, stop: asyncio.Event, headers: dict, every_s: float = 0.25) -> list[float]:
    """GET /health every `every_s` until `stop`; each answer's latency in ms (the server must answer while busy)."""
    out: list[float] = []
    while not stop.is_set():
        t0 = time.perf_counter()
        r = await client.get("/health", headers=headers)
        if r.status_code == 200:
            out.append((time.perf_counter() - t0) * 1000)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass
    return out


async def overload(client: httpx.AsyncClient, n: int, headers: dict, probes: int = 20, max_tokens: int = 8,
                   burst: httpx.AsyncClient | None = None) -> dict:
    """Fill the server: `n` requests at once (more than the batch and the queue hold). Once /health
    says it is saturated, send `probes` requests one after another and time their answers (429
    expected: the refusal a client waits for). Then wait for the burst and count its outcomes."""
    def body(i: int) -> dict:
        return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = await c.post("/v1/completions", json=body(i), headers=headers)
        return r.status_code, (time.perf_counter() - t0) * 1000

    # by default a client of its own with a connection per request: no request waits for a free connection
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    own = burst is None
    burst = burst or httpx.AsyncClient(base_url=client.base_url, limits=limits, timeout=client.timeout, trust_env=False)
    try:
        tasks = [asyncio.create_task(one(burst, i)) for i in range(n)]
        saturated = False
        for _ in range(400):
            if (await client.get("/health", headers=headers)).json().get("saturated"):
                saturated = True
                break
            await asyncio.sleep(0.05)
        probed = [await one(client, i) for i in range(probes)] if saturated else []
        got = await asyncio.gather(*tasks)
    finally:
        if own:
            await burst.aclose()
    refused = [ms for status, ms in probed if status == 429]
    return {"sent": n, "ok": sum(status == 200 for status, _ in got), "rate_limited": sum(status == 429 for status, _ in got),
            "other": sorted({status for status, _ in got + probed} - {200, 429}), "saturated": saturated,
            "probes": len(probed), "probes_rate_limited": len(refused),
            "rate_limited_p50_ms": percentile(refused, 0.5), "rate_limited_max_ms": max(refused, default=None)}


async def run_level(client: httpx.AsyncClient, *, mode: str, sampling: str, concurrency: int, requests: int,
                    max_tokens: int, deadline: float, headers: dict, prompts: list[str]) -> dict:
    """N requests with exactly `concurrency` in flight; no request starts past `deadline` (monotonic)."""
    results: list[dict | None] = [None] * requests
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}, "mode": mode}
            body.update(GREEDY if sampling == "greedy" else SAMPLED)
            results[i] = await one_request(client, body, headers)

    t0 = time.perf_counter()
    stop = asyncio.Event()
    probe = asyncio.create_task(probe_health(client, stop, headers))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    stop.set()
    health_ms = await probe

    done = [r for r in results if r is not None]
    ok = [r for r in done if r["error"] is None]
    rate_limited = sum(r["status"] == 429 for r in done)
    errors: dict[str, int] = {}
    for r in done:
        if r["error"] is not None and r["status"] != 429:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    latencies = [r["latency_s"] for r in ok]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    return {
        "mode": mode, "sampling": sampling, "concurrency": concurrency, "max_tokens": max_tokens,
        "requests": requests, "sent": len(done), "complete": len(done) == requests,
        "ok": len(ok), "failed": len(done) - len(ok), "rate_limited": rate_limited, "errors": errors,
        "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
        "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95),
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
        "health_p50_ms": percentile(health_ms, 0.5), "health_max_ms": max(health_ms, default=None),
        "exact": None, "exact_compared": None,
        "outputs": [r["text"] if r is not None else None for r in results],
    }


async def run_load(client: httpx.AsyncClient, *, concurrencies: list[int], modes: list[str], samplings: list[str],
                   requests: int, max_tokens: int, time_limit: float, api_key: str | None = None,
                   prompts: list[str] = PROMPTS, log=None) -> dict:  # noqa: ANN001
    """Every (mode, sampling, concurrency) level; returns {"rows", "stopped_by_time_limit", "levels_skipped"}.

    Greedy rows carry `exact` / `exact_compared`: outputs equal to the same prompt's output at
    concurrency 1 (of the same mode), over the requests both have an output for."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + time_limit
    levels = [(m, s, c) for m in modes for s in samplings for c in sorted(set(concurrencies))]
    rows: list[dict] = []
    reference: dict[str, dict[str, str]] = {}  # mode -> prompt -> output at concurrency 1 (greedy)
    stopped = False
    for mode, sampling, c in levels:
        if time.monotonic() >= deadline:
            stopped = True
            break
        row = await run_level(client, mode=mode, sampling=sampling, concurrency=c, requests=requests,
                              max_tokens=max_tokens, deadline=deadline, headers=headers, prompts=prompts)
        if sampling == "greedy":
            by_prompt = {prompts[i % len(prompts)]: t for i, t in enumerate(row["outputs"]) if t is not None}
            if c == 1:
                reference[mode] = by_prompt
            # every output against concurrency 1's for its prompt (at C=1 this checks repeats agree)
            ref = reference.get(mode)
            if ref is not None:
                pairs = [(t, ref[prompts[i % len(prompts)]]) for i, t in enumerate(row["outputs"])
                         if t is not None and prompts[i % len(prompts)] in ref]
                row["exact"] = sum(a == b for a, b in pairs)
                row["exact_compared"] = len(pairs)
        rows.append(row)
        if log:
            log(row)
        if not row["complete"]:
            stopped = True
            break
    return {"rows": rows, "stopped_by_time_limit": stopped, "levels_skipped": len(levels) - len(rows)}


def _fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


HEADER = (f"{'mode':<6} {'sampling':<8} {'C':>3} {'sent':>5} {'ok':>5} {'429':>4} {'err':>4} {'tok/s':>8} "
          f"{'lat p50':>8} {'lat p95':>8} {'ttft p50':>8} {'ttft p95':>8} {'exact':>7} {'health ms':>9}")


def format_row(r: dict) -> str:
    exact = "-" if r["exact"] is None else f"{r['exact']}/{r['exact_compared']}"
    return (f"{r['mode']:<6} {r['sampling']:<8} {r['concurrency']:>3} {r['sent']:>5} {r['ok']:>5} "
            f"{r['rate_limited']:>4} {r['failed'] - r['rate_limited']:>4} {_fmt(r['tokens_per_s'], digits=1):>8} "
            f"{_fmt(r['latency_p50_s']):>8} {_fmt(r['latency_p95_s']):>8} {_fmt(r['ttft_p50_s']):>8} "
            f"{_fmt(r['ttft_p95_s']):>8} {exact:>7} {_fmt(r['health_max_ms'], digits=1):>9}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tidar.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--max-queue", str(max(64, max(args.concurrency)))]
    for flag in ("model", "dtype", "threads", "max_batch"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ)
    if args.api_key:
        env["TIDAR_API_KEY"] = args.api_key  # not on the command line, which other users can read
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    t_end = time.monotonic() + args.startup_timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"tidar serve exited with status {proc.returncode} before it answered /health")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"tidar serve did not answer /health within {args.startup_timeout:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def drive(args: argparse.Namespace, url: str) -> dict:
    biggest = max(args.concurrency)
    limits = httpx.Limits(max_connections=biggest + 8, max_keepalive_connections=biggest + 8)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    # trust_env=False: no proxy from the environment between us and the loopback server
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False) as client:
        health = (await client.get("/health")).json()
        print(f"server {url}: {json.dumps(health)}")
        print(HEADER, flush=True)
        out = await run_load(client, concurrencies=args.concurrency, modes=args.modes, samplings=args.sampling,
                             requests=args.requests, max_tokens=args.max_tokens, time_limit=args.time_limit,
                             api_key=args.api_key, log=lambda r: print(format_row(r), flush=True))
        out["health"] = health
        if args.overload:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            out["overload"] = await overload(client, args.overload, headers)
            print("overload:", json.dumps(out["overload"]), flush=True)
        out["health_after"] = (await client.get("/health")).json()
    return out


def int_list(s: str) -> list[int]:
    values = [int(x) for x in s.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def name_list(allowed: tuple[str, ...]):  # noqa: ANN201
    def parse(s: str) -> list[str]:
        values = [x.strip() for x in s.split(",") if x.strip()]
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(allowed)}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one, see --serve)")
    p.add_argument("--serve", action="store_true",
                   help="start `tidar serve` on a free loopback port, run, stop it (the default without --url)")
    p.add_argument("--model", default=None, help="--serve: model passed to tidar serve")
    p.add_argument("--dtype", default=None, help="--serve: dtype passed to tidar serve")
    p.add_argument("--threads", type=int, default=None, help="--serve: torch threads of tidar serve")
    p.add_argument("--max-batch", type=int, default=None, help="--serve: sequences decoded together (tidar serve --max-batch)")
    p.add_argument("--overload", type=int, default=0,
                   help="after the levels, send this many 8-token requests at once (more than the batch and the queue hold) "
                        "and report the 429s and how fast they came (default: 0, off)")
    p.add_argument("--startup-timeout", type=float, default=600, help="--serve: seconds to wait for /health")
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 16, 64], help="levels (default: 1,4,16,64)")
    p.add_argument("--modes", type=name_list(("tidar", "ar")), default=["tidar", "ar"])
    p.add_argument("--sampling", type=name_list(("greedy", "sampled")), default=["greedy", "sampled"])
    p.add_argument("--requests", type=int, default=32, help="requests per level (default: 32)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=1800, help="seconds for the whole run (default: 1800)")
    p.add_argument("--request-timeout", type=float, default=600, help="client timeout per request, seconds")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--json", type=Path, default=None, help="write every row, /health and the date here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.url is not None and args.serve:
        print("load.py: --url and --serve exclude each other", file=sys.stderr)
        return 2
    if args.url is not None:
        try:
            check_loopback(args.url)
        except ValueError as e:
            print(f"load.py: {e}", file=sys.stderr)
            return 2
    proc = None
    try:
        url = args.url
        if url is None:
            proc, url = start_server(args)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        out = asyncio.run(drive(args, url.rstrip("/")))
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"load.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_server(proc)
    if out["stopped_by_time_limit"]:
        print(f"time limit of {args.time_limit:g} s reached: stopped; {out['levels_skipped']} level(s) not run, "
              "the last row may be partial")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"date": started, "url": url, "served_here": proc is not None, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}, **out}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
