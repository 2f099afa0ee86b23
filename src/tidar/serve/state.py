"""Everything one app serves with: the runtime, its settings, the worker, metrics, keys and learning."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from tidar.runtime import Runtime
from tidar.serve.auth import ApiKeys
from tidar.serve.config import ServerConfig, ServerConfigError
from tidar.serve.errors import APIError
from tidar.serve.learning import Learning
from tidar.serve.metrics import Metrics
from tidar.serve.worker import Worker


class ServerState:
    def __init__(self, runtime: Runtime, name: str, config: ServerConfig) -> None:
        learn = config.learn or runtime.learn  # a runtime set to learn (the old API) is a request to learn
        replace(config, learn=learn).check()
        if learn and runtime.datastore is None:
            raise ServerConfigError(f"--learn needs a model with a datastore; {runtime.name or 'this model'} has none")
        self.runtime, self.name, self.config = runtime, name, config
        self.created = int(time.time())
        self.keys = ApiKeys(config.api_keys)
        self.learning = Learning(runtime.datastore, learn, len(self.keys))
        self.worker = Worker(runtime, config.max_queue, max_batch=config.max_batch)
        self.metrics = Metrics(self.worker)
        self.worker.observer = self.metrics  # the worker reports its steps to the metrics
        # tokenization and chat templates: off the event loop (a huge prompt must not stall /health),
        # off the engine thread (it must not wait behind a generation)
        self.text_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tidar-text")

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.worker.closed:  # the pool is shut down too
            raise APIError("the server is shutting down", 503, "server_error", code="shutting_down")
        return await asyncio.get_running_loop().run_in_executor(self.text_pool, fn, *args)

    def close(self) -> None:
        self.worker.close()
        self.text_pool.shutdown(wait=False, cancel_futures=True)
