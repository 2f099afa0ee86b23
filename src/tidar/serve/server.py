"""OpenAI-compatible HTTP server: `tidar serve --model DIR`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics.
Requests take OpenAI's fields (model, prompt | messages, max_tokens, temperature, top_p, seed, stop,
stream, stream_options, n=1) plus our extensions `mode` ("tidar" | "ar"), `block_size` and `top_k`;
responses have OpenAI's shapes plus a `tidar` object with the engine's statistics
(tokens_per_forward, acceptance_histogram, tokens_per_s, ...).

Modules, one per role:
- `app`: `create_app`, the routes and the middleware stack.
- `config`: `ServerConfig`, what an operator sets (`tidar serve` flags).
- `schema`, `validation`: request bodies and the checks beyond their types. Validation is strict:
  every bad request is a 4xx with OpenAI's error body, never a 500 (wrong types, non-finite numbers,
  lone surrogates, a `model` other than the one served: 404 model_not_found); a field the server
  does not implement is a 400 naming it unless its value means "off". Greedy: temperature 0 or
  top_p 0 (or below GREEDY_TEMPERATURE / GREEDY_TOP_P).
- `worker`: the bounded queue and the one thread that runs the model, one request at a time
  (a list of prompts in one /v1/completions request is one batch; continuous batching across
  requests replaces `Worker._run` later). Jobs are cancelled between decoding steps.
- `responses`: waiting on a job (deadline, client disconnect) and OpenAI's JSON / SSE shapes.
- `errors`: OpenAI's error body; an unexpected failure is a 500 with `Connection: close`.
- `limits` (body size), `auth` (API keys), `learning` (per-key datastores), `metrics` (Prometheus).

Limits and their statuses: a full queue (--max-queue) is a 429 with Retry-After; max_tokens above
--max-tokens-limit a 400; a body over --max-body-bytes a 413 (before parsing); a request past
--request-timeout a 504 (a started stream ends with an error event); a client that leaves has its
generation stopped (counted as status 499). With API keys (--api-key / TIDAR_API_KEY) every /v1
route needs `Authorization: Bearer <key>` (401 invalid_api_key); /health and /metrics stay open and
show aggregates only. --learn needs keys: each key's answers teach only its own datastore.

This module keeps the names other code imports from here.
"""

from __future__ import annotations

from tidar.serve.app import create_app
from tidar.serve.config import ServerConfig, ServerConfigError
from tidar.serve.errors import APIError, error_body, error_response
from tidar.serve.schema import ChatMessage, ChatRequest, CompletionRequest

__all__ = ["APIError", "ChatMessage", "ChatRequest", "CompletionRequest", "ServerConfig", "ServerConfigError",
           "create_app", "error_body", "error_response"]
