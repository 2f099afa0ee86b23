"""`tidar serve`: every flag reaches what it configures (the runtime load, the app, uvicorn,
logging), on a tiny random model; uvicorn.run is captured, so no port is opened."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("prometheus_client", reason="the `serve` extra (prometheus-client) is not installed")
pytest.importorskip("uvicorn", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

from conftest import tiny_model  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_server import CharTokenizer  # noqa: E402

from tidar.cli.serve import main  # noqa: E402
from tidar.decode import Datastore  # noqa: E402
from tidar.runtime import Runtime  # noqa: E402
from tidar.serve.config import ServerConfig  # noqa: E402


@pytest.fixture
def served(monkeypatch):
    """Runs `tidar serve` without loading weights or listening: records what Runtime.load,
    torch.set_num_threads, logging.basicConfig and uvicorn.run were called with."""
    calls: dict = {"datastore": None}
    monkeypatch.delenv("TIDAR_API_KEY", raising=False)  # keys come from the flags each test passes

    def load(cls, name=None, dtype="bfloat16", compile=None, weights=None):
        calls["load"] = (name, dtype, compile)
        return Runtime(tiny_model(), CharTokenizer(), {"block_size": 3}, name="/models/tiny",
                       datastore=calls["datastore"])

    monkeypatch.setattr(Runtime, "load", classmethod(load))
    monkeypatch.setattr("torch.set_num_threads", lambda n: calls.__setitem__("threads", n))
    monkeypatch.setattr("logging.basicConfig", lambda **kw: calls.__setitem__("logging", kw))
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.update(app=app, uvicorn=kw))
    return calls


def test_defaults(served):
    assert main([]) == 0
    assert served["load"] == (None, "bfloat16", None)
    assert served["uvicorn"] == {"host": "127.0.0.1", "port": 8000, "log_level": "info"}
    assert served["logging"] == {"level": "INFO"}
    assert "threads" not in served
    state = served["app"].state.server
    assert state.config == ServerConfig(max_queue=64, max_tokens_limit=None, request_timeout=600.0,
                                        max_body_bytes=1 << 20, api_keys=[], allowed_origins=[], learn=False)
    assert not state.learning.enabled
    with TestClient(served["app"]) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"  # the model directory's name


def test_model_dtype_compile_and_threads_reach_the_runtime(served):
    assert main(["--model", "some/dir", "--dtype", "fp32", "--compile", "--threads", "3"]) == 0
    assert served["load"] == ("some/dir", "float32", True) and served["threads"] == 3
    assert main(["--no-compile"]) == 0
    assert served["load"] == (None, "bfloat16", False)


def test_host_and_port_go_to_uvicorn(served):
    assert main(["--host", "0.0.0.0", "--port", "9123"]) == 0
    assert served["uvicorn"]["host"] == "0.0.0.0" and served["uvicorn"]["port"] == 9123


def test_served_model_name_is_the_id_clients_see(served):
    assert main(["--served-model-name", "my-model"]) == 0
    with TestClient(served["app"]) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "my-model"
        assert c.get("/health").json()["model"] == "my-model"
        body = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4, "temperature": 0}).json()
    assert body["model"] == "my-model"


def test_log_level_sets_the_server_and_uvicorn_levels(served):
    assert main(["--log-level", "debug"]) == 0
    assert served["logging"] == {"level": "DEBUG"} and served["uvicorn"]["log_level"] == "debug"


def test_learn_turns_on_learning_per_api_key(served):
    served["datastore"] = Datastore([[1, 2, 3]], vocab_size=97)
    assert main(["--learn", "--api-key", "k1", "--api-key", "k2"]) == 0
    learning = served["app"].state.server.learning
    assert learning.enabled and learning.store(0) is not learning.store(1)
    assert served["app"].state.server.config.learn is True


def test_learn_without_an_api_key_is_refused_before_loading(served, capsys, monkeypatch):
    monkeypatch.delenv("TIDAR_API_KEY", raising=False)
    served["datastore"] = Datastore([[1, 2, 3]], vocab_size=97)
    assert main(["--learn"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --learn needs an API key") and len(err.splitlines()) == 1
    assert "load" not in served and "uvicorn" not in served


def test_learn_without_a_datastore_is_one_line_and_serves_nothing(served, capsys):
    assert main(["--learn", "--api-key", "k"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --learn needs a model with a datastore") and len(err.splitlines()) == 1
    assert "uvicorn" not in served


def test_limits_reach_the_server(served):
    assert main(["--max-queue", "3", "--max-tokens-limit", "100", "--request-timeout", "2.5",
                 "--max-body-bytes", "1000"]) == 0
    config = served["app"].state.server.config
    assert (config.max_queue, config.max_tokens_limit, config.request_timeout, config.max_body_bytes) == (3, 100, 2.5, 1000)
    assert served["app"].state.server.worker.max_queue == 3
    with TestClient(served["app"]) as c:
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 101})
        assert r.status_code == 400 and "limit of 100" in r.json()["error"]["message"]
        assert c.post("/v1/completions", content=b"x" * 1001).status_code == 413
        assert c.get("/health").json()["max_queue"] == 3
    assert main(["--request-timeout", "0"]) == 0
    assert served["app"].state.server.config.request_timeout is None  # 0: no limit


def test_api_keys_from_the_flag_or_the_environment(served, monkeypatch):
    monkeypatch.setenv("TIDAR_API_KEY", "env-1, env-2")
    assert main([]) == 0
    assert served["app"].state.server.config.api_keys == ["env-1", "env-2"]
    with TestClient(served["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer env-2"}).status_code == 200
    assert main(["--api-key", "flag"]) == 0  # the flag wins over the environment
    assert served["app"].state.server.config.api_keys == ["flag"]
    with TestClient(served["app"]) as c:
        assert c.get("/v1/models", headers={"Authorization": "Bearer env-1"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer flag"}).status_code == 200


def test_allowed_origins_turn_on_cors(served):
    assert main(["--allowed-origins", "https://a.example, https://b.example"]) == 0
    assert served["app"].state.server.config.allowed_origins == ["https://a.example", "https://b.example"]
    with TestClient(served["app"]) as c:
        r = c.get("/v1/models", headers={"Origin": "https://b.example"})
        assert r.headers["access-control-allow-origin"] == "https://b.example"
    assert main([]) == 0
    with TestClient(served["app"]) as c:
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": "https://b.example"}).headers


@pytest.mark.parametrize("args, fragment", [
    (["--port", "0"], "must be >= 1"),
    (["--port", "70000"], "at most 65535"),
    (["--port", "http"], "expected a positive integer"),
    (["--log-level", "loud"], "invalid choice"),
    (["--threads", "0"], "must be >= 1"),
    (["--dtype", "int8"], "dtype must be"),
    (["--max-queue", "0"], "must be >= 1"),
    (["--max-tokens-limit", "0"], "must be >= 1"),
    (["--max-body-bytes", "-5"], "must be >= 1"),
    (["--request-timeout", "-1"], "seconds >= 0"),
    (["--request-timeout", "nan"], "seconds >= 0"),
    (["--request-timeout", "soon"], "expected a number of seconds"),
])
def test_bad_flags_are_one_line_errors(served, capsys, args, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tidar serve:") and fragment in err and len(err.splitlines()) == 1
    assert "load" not in served


def test_an_empty_api_key_is_refused(served, capsys):
    assert main(["--api-key", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert "an API key must not be empty" in err and len(err.splitlines()) == 1 and "load" not in served

