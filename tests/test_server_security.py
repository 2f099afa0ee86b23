"""Security (issue 27, item 4): API keys on every /v1 route (401 invalid_api_key), CORS only when
configured, --learn refused without keys, and learning isolated per key (drafts and /health)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

from conftest import tiny_model  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_server import CharTokenizer, assert_openai_error  # noqa: E402
from test_server_limits import make_app, tiny_runtime  # noqa: E402

from tidar.decode import Datastore  # noqa: E402
from tidar.runtime import Runtime  # noqa: E402
from tidar.serve.server import ServerConfig, ServerConfigError, create_app  # noqa: E402

KEYS = ["key-a", "key-b"]
V1 = [("GET", "/v1/models", None),
      ("POST", "/v1/completions", {"prompt": "abc", "max_tokens": 2}),
      ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed():
    with TestClient(make_app(api_keys=KEYS)) as c:
        yield c


@pytest.mark.parametrize("method, path, body", V1)
@pytest.mark.parametrize("headers, fragment", [
    ({}, "Missing API key"),
    (bearer("wrong"), "Incorrect API key provided"),
    (bearer("key-a "[:-1] + "x"), "Incorrect API key provided"),
    (bearer(""), "Incorrect API key provided"),
    ({"Authorization": "key-a"}, "Incorrect API key provided"),  # no scheme
    ({"Authorization": "Basic key-a"}, "Incorrect API key provided"),
])
def test_v1_routes_need_a_valid_key(keyed, method, path, body, headers, fragment):
    r = keyed.request(method, path, json=body, headers=headers)
    assert_openai_error(r, 401, fragment, code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert "wrong" not in r.text  # a key is never echoed


@pytest.mark.parametrize("method, path, body", V1)
@pytest.mark.parametrize("key", KEYS)
def test_v1_routes_answer_with_any_configured_key(keyed, method, path, body, key):
    assert keyed.request(method, path, json=body, headers=bearer(key)).status_code == 200
    assert keyed.request(method, path, json=body, headers={"Authorization": f"bearer  {key}"}).status_code == 200


def test_probes_stay_open_and_unknown_v1_paths_need_the_key_too(keyed):
    assert keyed.get("/health").status_code == 200 and keyed.get("/metrics").status_code == 200
    assert keyed.get("/v1/nothing").status_code == 401  # nothing about the routes leaks without a key
    assert keyed.get("/v1/nothing", headers=bearer("key-a")).status_code == 404
    # the key is checked before the body is read: an unauthenticated client cannot make the server parse
    assert keyed.post("/v1/completions", content=b"{not json").status_code == 401


def test_without_keys_every_route_is_open():
    with TestClient(make_app()) as c:
        for method, path, body in V1:
            assert c.request(method, path, json=body).status_code == 200


# -- CORS ----------------------------------------------------------------------------------------
PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_no_cors_headers_unless_configured():
    with TestClient(make_app()) as c:
        r = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
        assert c.options("/v1/completions", headers=PREFLIGHT).status_code == 405


def test_cors_for_the_allowed_origins_only():
    with TestClient(make_app(allowed_origins=["https://app.example"], api_keys=KEYS)) as c:
        pre = c.options("/v1/completions", headers=PREFLIGHT)  # a preflight carries no key
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        ok = c.get("/v1/models", headers={"Origin": "https://app.example", **bearer("key-a")})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        denied = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert denied.status_code == 401  # with CORS headers, so the page can read why
        assert denied.headers["access-control-allow-origin"] == "https://app.example"
        other = c.get("/v1/models", headers={"Origin": "https://evil.example", **bearer("key-a")})
        assert "access-control-allow-origin" not in other.headers
        assert c.options("/v1/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"}).status_code == 400


# -- learning --------------------------------------------------------------------------------------
def learning_runtime() -> Runtime:
    return Runtime(tiny_model(), CharTokenizer(), {"block_size": 3, "datastore_tokens": 8}, name="/models/tiny",
                   datastore=Datastore([[1, 2, 3]], vocab_size=97))


def test_learning_without_api_keys_is_refused():
    with pytest.raises(ServerConfigError, match="--learn needs an API key"):
        create_app(learning_runtime(), config=ServerConfig(learn=True))
    rt = learning_runtime()
    rt.learn = True  # the runtime's own switch asks for learning too
    with pytest.raises(ServerConfigError, match="--learn needs an API key"):
        create_app(rt)
    with pytest.raises(ServerConfigError, match="needs a model with a datastore"):
        create_app(tiny_runtime(), config=ServerConfig(learn=True, api_keys=KEYS))


def test_what_one_key_teaches_drafts_only_that_keys_requests():
    rt = learning_runtime()
    app = create_app(rt, config=ServerConfig(learn=True, api_keys=KEYS))
    body = {"prompt": "the cat", "max_tokens": 24, "temperature": 0}

    def datastore_drafts(key: str) -> int:
        r = c.post("/v1/completions", json=body, headers=bearer(key))
        assert r.status_code == 200, r.text
        return r.json()["tidar"]["accepted_drafts"]["datastore"]

    with TestClient(app) as c:
        a_first, a_second = datastore_drafts("key-a"), datastore_drafts("key-a")
        b_first = datastore_drafts("key-b")
        assert a_second > a_first + 10  # key A drafts from its own earlier answer
        assert b_first == a_first  # key B does not: A's answers never reached B's store
        learning = app.state.server.learning
        assert learning.store(0).learned_sequences == 2 and learning.store(1).learned_sequences == 1
        assert rt.datastore.learned_sequences == 0  # the shared store learns nothing
        # /health: a key sees its own counts; anyone else sees none
        assert c.get("/health", headers=bearer("key-a")).json()["learned_sequences"] == 2
        assert c.get("/health", headers=bearer("key-b")).json()["learned_sequences"] == 1
        for headers in ({}, bearer("wrong")):
            health = c.get("/health", headers=headers).json()
            assert not any(k.startswith("learned") for k in health)
