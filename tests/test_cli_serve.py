"""`tidar serve`: every flag reaches what it configures (the runtime load, the app, uvicorn,
logging), on a tiny random model; uvicorn.run is captured, so no port is opened."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

from conftest import tiny_model  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_server import CharTokenizer  # noqa: E402

from tidar.cli.serve import main  # noqa: E402
from tidar.decode import Datastore  # noqa: E402
from tidar.runtime import Runtime  # noqa: E402


@pytest.fixture
def served(monkeypatch):
    """Runs `tidar serve` without loading weights or listening: records what Runtime.load,
    torch.set_num_threads, logging.basicConfig and uvicorn.run were called with."""
    calls: dict = {"datastore": None}

    def load(cls, name=None, dtype="bfloat16", compile=None):
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
    assert served["app"].state.engine.runtime.learn is False
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


def test_learn_turns_on_learning_from_served_outputs(served):
    served["datastore"] = Datastore([[1, 2, 3]], vocab_size=97)
    assert main(["--learn"]) == 0
    assert served["app"].state.engine.runtime.learn is True


def test_learn_without_a_datastore_is_one_line_and_serves_nothing(served, capsys):
    assert main(["--learn"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --learn needs a model with a datastore") and len(err.splitlines()) == 1
    assert "uvicorn" not in served


@pytest.mark.parametrize("args, fragment", [
    (["--port", "0"], "must be >= 1"),
    (["--port", "70000"], "at most 65535"),
    (["--port", "http"], "expected a positive integer"),
    (["--log-level", "loud"], "invalid choice"),
    (["--threads", "0"], "must be >= 1"),
    (["--dtype", "int8"], "dtype must be"),
])
def test_bad_flags_are_one_line_errors(served, capsys, args, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tidar serve:") and fragment in err and len(err.splitlines()) == 1
    assert "load" not in served

