"""`--learn`, one datastore per API key: what a key's requests taught drafts only that key's later
requests, and only that key sees its counts. Each key's store is a `Datastore.fork()` of the
model's: the n-gram tables are shared (read-only), the learned part is the key's own. The model's
own store never learns, so nothing crosses from one key to another."""

from __future__ import annotations

from typing import Any

from tidar.decode import Datastore


class Learning:
    def __init__(self, base: Datastore | None, enabled: bool, keys: int) -> None:
        self.enabled = enabled and base is not None
        self._stores = [base.fork() for _ in range(keys)] if self.enabled and base is not None else []

    def store(self, key: int | None) -> Datastore | None:
        """The datastore a request with `key` drafts from (None: the model's own, which never learns)."""
        return self._stores[key] if self.enabled and key is not None else None

    def counts(self, key: int | None) -> dict[str, Any]:
        """For /health: the key's learned counts; nothing without a key (or without learning)."""
        store = self.store(key)
        if store is None:
            return {}
        return {"learned_sequences": store.learned_sequences, "learned_tokens": store.learned_tokens}
