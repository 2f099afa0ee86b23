"""The queue in front of the model and the one worker thread that runs it.

The model and its KV cache are not re-entrant, so every generation runs on one thread, one job (a
request's prompts, decoded as one batch) at a time, in arrival order. The queue is bounded: past
`max_queue` waiting jobs `submit` refuses (the server answers 429). A job can be cancelled at any
time (its client went away, its deadline passed): a waiting one leaves the queue at once, a running
one stops between two decoding steps, since the worker drives `Decoder.stream` itself and looks at
the job's cancel flag after every forward.

Continuous batching replaces `Worker._run` with a scheduler that admits queued jobs into the running
batch between steps; `submit`, `cancel`, `depth`, the `Job` events and the `Observer` hooks stay.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from tidar.decode import Datastore, Decoder, GenerationConfig, GenerationStats
from tidar.runtime import Runtime, StreamedTexts, TextResult

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` jobs; `retry_after` (seconds) estimates when a slot frees."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"{depth} requests are already waiting")
        self.depth, self.retry_after = depth, retry_after


class WorkerClosed(Exception):
    """The server is shutting down: no new jobs."""


class Observer:
    """What the worker reports as it goes (the metrics implement it); every hook is a no-op here.
    Called on the worker thread."""

    def on_batch(self, sequences: int) -> None: ...  # sequences now decoding (0: idle)
    def on_first_token(self, seconds: float) -> None: ...  # arrival to the first token
    def on_step(self, tokens: int) -> None: ...  # one model forward emitted `tokens`
    def on_finished(self, stats: GenerationStats) -> None: ...
    def on_cancelled(self, reason: str) -> None: ...  # "disconnect" | "timeout" | "shutdown"


@dataclass(eq=False)  # identity equality: the queue removes exactly this job
class Job:
    """One request's generation. The worker reports through `events` (on the event loop that made
    the job): ("start",) after the prefill, ("text", i, text) while streaming, then ("done", results)
    or ("error", exception). A cancelled job reports nothing more."""

    prompts: list[list[int]]
    gen: GenerationConfig
    stop: list[str]
    stream: bool = False  # send ("text", ...) events
    store: Datastore | None = None  # the datastore to draft from (None: the model's own)
    learn: bool = False  # teach `store` the outputs once the job is done
    arrived: float = field(default_factory=time.monotonic)
    reason: str | None = None  # why it was cancelled
    finished: bool = False  # its outcome is reported (set before the event is sent)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self, reason: str) -> bool:
        """Returns whether this call cancelled it (False: it already was)."""
        if self._cancel.is_set():
            return False
        self.reason = reason
        self._cancel.set()
        return True

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        return self._cancel.wait(timeout)

    def put(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody to tell
            self.cancel("shutdown")


class Worker:
    """The bounded queue and the thread that decodes its jobs one at a time (see the module doc)."""

    def __init__(self, runtime: Runtime, max_queue: int, observer: Observer | None = None) -> None:
        self.runtime = runtime
        self.max_queue = max_queue
        self.observer = observer or Observer()
        self.current: Job | None = None  # the job decoding now
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._mean_s = 1.0  # running mean of a job's service time, for Retry-After

    # -- read by /health and /metrics without waiting on the model -------------------------------
    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def saturated(self) -> bool:
        return len(self._queue) >= self.max_queue

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running_batch(self) -> int:
        job = self.current
        return len(job.prompts) if job is not None else 0

    # -- called from the event loop ---------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when `max_queue` jobs already wait, WorkerClosed after `close`."""
        with self._cond:
            if self._closed:
                raise WorkerClosed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), self._retry_after())
            self._queue.append(job)
            if self._thread is None:  # started on first use, so an app that never generates owns no thread
                self._thread = threading.Thread(target=self._run, name="tidar-engine", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def cancel(self, job: Job, reason: str) -> None:
        """Stop `job`: out of the queue now (its slot frees), or at the next step if running."""
        if job.finished or not job.cancel(reason):
            return
        self.observer.on_cancelled(reason)
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._cond.notify_all()

    def _retry_after(self) -> int:
        # a slot frees when the running job ends and the next one starts: about one mean service time
        return max(1, min(60, math.ceil(self._mean_s)))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running (tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self.current is None, timeout)

    def close(self) -> None:
        """Refuse new jobs, drop the waiting ones and stop the running one at its next step."""
        with self._cond:
            self._closed = True
            jobs = [*self._queue, *([self.current] if self.current else [])]
            self._queue.clear()
            self._cond.notify_all()
        for job in jobs:
            job.cancel("shutdown")

    # -- the worker thread ---------------------------------------------------------------------
    def _take(self) -> Job | None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            if self._closed:
                return None
            self.current = self._queue.popleft()
            return self.current

    def _run(self) -> None:
        while (job := self._take()) is not None:
            t0 = time.perf_counter()
            try:
                run_job(self.runtime, job, self.observer)
            finally:
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - t0)
                with self._cond:
                    self.current = None
                    self._cond.notify_all()


def run_job(runtime: Runtime, job: Job, observer: Observer) -> None:
    """Decode `job` and report its outcome through its events."""
    if job.cancelled:  # cancelled after it was taken from the queue
        return
    try:
        results = _decode(runtime, job, observer)
    except Exception as e:  # noqa: BLE001 - handed to the request, which turns it into an error body
        job.finished = True
        job.put("error", e)
        return
    if results is None:
        return  # cancelled mid-way: the request was already answered
    if job.learn and job.store is not None:
        for r in results:
            job.store.learn(r.tokens)
    job.finished = True
    job.put("done", results)


def _decode(runtime: Runtime, job: Job, observer: Observer) -> list[TextResult] | None:
    """`Runtime.generate_ids`, driven step by step: None when the job was cancelled."""
    decoder = Decoder(runtime.model, job.gen, job.store)
    on_text = (lambda i, text: job.put("text", i, text)) if job.stream else None
    texts = StreamedTexts(runtime.tokenizer, job.stop, len(job.prompts), on_text)
    seqs: list[list[int]] = [[] for _ in job.prompts]
    t0 = time.perf_counter()
    observer.on_batch(len(job.prompts))
    try:
        with closing(decoder.stream(job.prompts)) as steps:
            for n, emitted in enumerate(steps):
                if n == 0:  # the prefill: headers of a stream go out now; a rejected prompt raised before
                    job.put("start")
                    observer.on_first_token(time.monotonic() - job.arrived)
                observer.on_step(_commit(decoder, emitted, seqs, texts))
                if job.cancelled:
                    return None
    finally:
        observer.on_batch(0)
    observer.on_finished(decoder.stats)
    stats = {**decoder.stats.as_dict(), "wall_s": round(time.perf_counter() - t0, 4)}
    return texts.results(seqs, stats, set(runtime.eos_ids))


def _commit(decoder: Decoder, emitted: list[list[int]], seqs: list[list[int]], texts: StreamedTexts) -> int:
    """Append one step's tokens; a sequence that completed a stop string ends there. Returns the
    number of tokens kept."""
    kept = 0
    for i, toks in enumerate(emitted):
        if not toks:
            continue
        keep = texts.push(i, toks)
        if keep is not None:
            toks = toks[:keep]
            decoder.done[i] = True  # as `generate`'s on_tokens: the engine stops this sequence
        seqs[i].extend(toks)
        kept += len(toks)
    return kept
