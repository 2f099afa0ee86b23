"""benchmarks/load.py (issue 27, item 6) against an in-process server on the tiny model: rows carry
their measurements, nothing fails, greedy outputs under load equal those at concurrency 1, and a
URL off loopback is refused."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="the load test drives the server with httpx")

from test_server_limits import async_client, make_app, stall, until  # noqa: E402

_spec = importlib.util.spec_from_file_location("load_bench", Path(__file__).parents[1] / "benchmarks" / "load.py")
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)

FIELDS = {"mode", "sampling", "concurrency", "requests", "sent", "complete", "ok", "failed", "rate_limited", "errors",
          "completion_tokens", "wall_s", "tokens_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s",
          "ttft_p95_s", "exact", "exact_compared", "outputs", "health_p50_ms", "health_max_ms"}


def test_load_levels_on_the_tiny_model():
    async def go() -> dict:
        async with async_client(make_app()) as client:
            return await load.run_load(client, concurrencies=[4, 1], modes=["tidar", "ar"],
                                       samplings=["greedy", "sampled"], requests=6, max_tokens=6, time_limit=60)

    out = asyncio.run(go())
    assert not out["stopped_by_time_limit"] and out["levels_skipped"] == 0
    rows = out["rows"]
    assert [(r["mode"], r["sampling"], r["concurrency"]) for r in rows] == [
        (m, s, c) for m in ("tidar", "ar") for s in ("greedy", "sampled") for c in (1, 4)]
    for r in rows:
        assert FIELDS <= r.keys()
        assert r["complete"] and r["sent"] == r["ok"] == 6 and r["failed"] == 0 and r["rate_limited"] == 0
        assert r["errors"] == {}
        assert 0 < r["completion_tokens"] <= 6 * 6 and r["tokens_per_s"] > 0
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"]
        assert r["ttft_p50_s"] is not None and r["ttft_p50_s"] <= r["latency_p95_s"]
        assert all(isinstance(t, str) for t in r["outputs"])
        assert r["health_max_ms"] >= r["health_p50_ms"] > 0  # /health was probed while the level ran
        if r["sampling"] == "greedy":
            assert r["exact"] == r["exact_compared"] == 6
        else:
            assert r["exact"] is None
    for mode in ("tidar", "ar"):
        one, four = (next(r for r in rows if (r["mode"], r["sampling"], r["concurrency"]) == (mode, "greedy", c))
                     for c in (1, 4))
        assert four["outputs"] == one["outputs"]
    assert load.format_row(rows[0]).split()[:3] == ["tidar", "greedy", "1"]


def test_an_overload_burst_fills_the_queue_and_probes_get_429_fast():
    app = make_app(max_queue=2, max_batch=1)

    async def go() -> dict:
        async with async_client(app) as client:
            with stall(app) as s:  # one request holds the model, so the burst meets a busy worker
                first = asyncio.create_task(client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4}))
                await until(s.reached.is_set, "the first request is in the model")
                task = asyncio.create_task(load.overload(client, 6, {}, probes=3, burst=client))
                await until(lambda: app.state.server.worker.saturated, "the queue filled")
                await asyncio.sleep(0.3)  # the probes run against the full queue
                s.release.set()
                assert (await first).status_code == 200
                return await task

    out = asyncio.run(go())
    assert out["saturated"] and out["probes"] == out["probes_rate_limited"] == 3
    assert out["sent"] == 6 and out["ok"] == 2 and out["rate_limited"] == 4 and out["other"] == []
    assert out["rate_limited_max_ms"] >= out["rate_limited_p50_ms"] > 0


def test_the_time_limit_stops_the_run():
    async def go() -> dict:
        async with async_client(make_app()) as client:
            return await load.run_load(client, concurrencies=[1, 4], modes=["ar"], samplings=["greedy"],
                                       requests=4, max_tokens=4, time_limit=0)

    out = asyncio.run(go())
    assert out["stopped_by_time_limit"] and out["rows"] == [] and out["levels_skipped"] == 2


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000/"])
def test_loopback_urls_are_accepted(url):
    load.check_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://127.0.0.1.evil.com:80",
                                 "ftp://127.0.0.1"])
def test_a_url_off_loopback_is_refused(url, capsys):
    with pytest.raises(ValueError, match="loopback"):
        load.check_loopback(url)
    assert load.main(["--url", url, "--requests", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing" in err


def test_percentile():
    assert load.percentile([], 0.5) is None
    assert load.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert load.percentile([1.0, 2.0], 0.95) == pytest.approx(1.95)
