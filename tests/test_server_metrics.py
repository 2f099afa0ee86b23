"""/metrics (issue 27, item 3): Prometheus' text format, one registry per app, the counters and
histograms a request moves; /health's queue fields (answering while the worker is blocked is in
test_server_limits)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("prometheus_client", reason="the `serve` extra (prometheus-client) is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_server_limits import make_app  # noqa: E402


def samples(c: TestClient) -> dict[tuple, float]:
    """{(name, (label, value), ...): value} of every sample /metrics exposes."""
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(m: dict[tuple, float], name: str, **labels: str) -> float:
    return m.get((name, *sorted(labels.items())), 0.0)


COMPLETIONS = {"endpoint": "/v1/completions"}


def test_metrics_count_requests_tokens_forwards_and_latencies():
    with TestClient(make_app()) as c:
        before = samples(c)
        assert value(before, "tidar_queue_depth") == 0 and value(before, "tidar_queue_capacity") == 64
        assert value(before, "tidar_running_batch_size") == 0
        body = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 12, "temperature": 0}).json()
        with c.stream("POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 5, "stream": True}) as r:
            r.read()
        assert c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 0}).status_code == 400
        after = samples(c)
    assert value(after, "tidar_requests_total", **COMPLETIONS, status="200") == 2
    assert value(after, "tidar_requests_total", **COMPLETIONS, status="400") == 1
    assert value(after, "tidar_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    tokens = body["usage"]["completion_tokens"]
    assert value(after, "tidar_generated_tokens_total") >= tokens + 1
    forwards = value(after, "tidar_forwards_total")
    assert 2 <= forwards <= value(after, "tidar_generated_tokens_total")  # TiDAR: >= 1 token per forward
    assert value(after, "tidar_time_to_first_token_seconds_count") == 2
    assert value(after, "tidar_tokens_per_forward_count") == 2
    assert value(after, "tidar_request_duration_seconds_count", **COMPLETIONS) == 3
    assert value(after, "tidar_request_duration_seconds_sum", **COMPLETIONS) > 0
    assert value(after, "tidar_running_batch_size") == 0


def test_unknown_paths_share_one_label_and_apps_keep_separate_counts():
    a, b = make_app(), make_app()
    with TestClient(a) as ca, TestClient(b) as cb:
        for path in ("/nothing", "/v1/nothing", "/admin"):
            assert ca.get(path).status_code == 404
        assert value(samples(ca), "tidar_requests_total", endpoint="other", status="404") == 3
        assert value(samples(cb), "tidar_requests_total", endpoint="other", status="404") == 0


def test_health_reports_the_queue():
    with TestClient(make_app(max_queue=5)) as c:
        assert c.get("/health").json() == {"status": "ok", "model": "tiny", "queue_depth": 0, "max_queue": 5,
                                           "saturated": False, "running": 0}
