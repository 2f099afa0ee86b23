"""What an operator sets for a server (`tidar serve` flags), with the defaults a library user gets."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BATCH = 16  # sequences decoding together; measured in docs/results.md (load test)
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~250K tokens of text, far past any model's context
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds; long enough for a full context on a CPU


class ServerConfigError(ValueError):
    """Settings that cannot serve safely (e.g. learning without API keys)."""


@dataclass
class ServerConfig:
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for the worker; past it: 429
    max_batch: int = DEFAULT_MAX_BATCH  # sequences in the running batch (continuous batching)
    max_tokens_limit: int | None = None  # cap on max_tokens (None: the context size decides)
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT  # seconds from arrival; None: no limit
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    allowed_origins: list[str] = field(default_factory=list)  # empty: no CORS headers
    learn: bool = False  # the datastore learns served answers, per API key

    def check(self) -> None:
        if self.max_queue < 1:
            raise ServerConfigError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_batch < 1:
            raise ServerConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ServerConfigError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ServerConfigError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if self.max_body_bytes < 1:
            raise ServerConfigError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if any(not k for k in self.api_keys):
            raise ServerConfigError("an API key must not be empty")
        if self.learn and not self.api_keys:
            # without keys every client would draft from (and so could probe) every other client's answers
            raise ServerConfigError("--learn needs an API key (--api-key or TIDAR_API_KEY): without one, "
                                    "what one client's answers teach would leak into every other client's")
