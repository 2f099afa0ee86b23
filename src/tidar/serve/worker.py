"""The queue in front of the model and the one worker thread that runs it: continuous batching.

The model and its KV cache are not re-entrant, so every generation runs on one thread, in one
running batch (`Decoder.join` / `step` / `leave`). Between two steps the scheduler admits waiting
jobs from the head of the queue into the batch (each joins with a prefill forward of its own) while
they are compatible with it (same decoding options and datastore; sampling with a fixed seed runs
alone, so its draws are reproducible) and the batch has room (`max_batch` sequences), and drops
the rows of jobs that finished or were cancelled. Whether a step drafts (TiDAR) or runs plain AR is
the engine's operating point (`max_draft_batch`). Greedy outputs do not depend on the company a
request keeps: the engine's arithmetic is per row (tested).

The queue is bounded: past `max_queue` waiting jobs `submit` refuses (the server answers 429). A
job can be cancelled at any time (its client went away, its deadline passed): a waiting one leaves
the queue at once, a running one leaves the batch before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from tidar.decode import Datastore, Decoder, GenerationConfig, GenerationError, GenerationStats
from tidar.runtime import Runtime, StreamedTexts

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


@dataclass(eq=False)
class Active:
    """A job in the running batch: what its prompts have produced so far."""

    job: Job
    texts: StreamedTexts
    seqs: list[list[int]]
    stats: list[dict | None]  # each prompt's statistics once it is done
    joined: float = field(default_factory=time.perf_counter)

    @property
    def finished(self) -> bool:
        return all(s is not None for s in self.stats)


@dataclass
class Batch:
    """The running batch: its decoder and, per row, the job and prompt index it decodes."""

    decoder: Decoder
    key: tuple
    owners: list[tuple[Active, int]] = field(default_factory=list)


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys can share a batch: one decoder config (max_new_tokens is per row) and
    one datastore. Seeded sampling gets a key of its own: its draws must not depend on other jobs."""
    alone = id(job) if job.gen.do_sample and job.gen.seed is not None else None
    return replace(job.gen, max_new_tokens=0), id(job.store), alone


class Worker:
    """The bounded queue and the thread that decodes its jobs in one running batch (module doc)."""

    def __init__(self, runtime: Runtime, max_queue: int, observer: Observer | None = None, max_batch: int = 16) -> None:
        self.runtime = runtime
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.observer = observer or Observer()
        self.running: list[Job] = []  # the jobs in the batch now (joining or decoding)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._mean_s = 1.0  # running mean of a job's time in the batch, for Retry-After

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
        """Sequences in the batch now (joining or decoding)."""
        return sum(len(j.prompts) for j in self.running)

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
        # a queue slot frees when a job in the batch ends and the head of the queue joins
        return max(1, min(60, math.ceil(self._mean_s / max(len(self.running), 1))))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running (tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self.running, timeout)

    def close(self) -> None:
        """Refuse new jobs, drop the waiting ones and stop the running ones before their next step."""
        with self._cond:
            self._closed = True
            jobs = [*self._queue, *self.running]
            self._queue.clear()
            self._cond.notify_all()
        for job in jobs:
            job.cancel("shutdown")

    # -- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        batch: Batch | None = None
        while (admitted := self._admit(batch)) is not None:
            if admitted:
                self.observer.on_batch(self.running_batch)
                batch = self._join(batch, admitted)
            if batch is None or not batch.owners:
                batch = None
                continue
            try:
                self._step(batch)
            except Exception as e:  # noqa: BLE001 - the batch is lost; each request gets the error
                log.exception("decoding step failed")
                self._fail(list({id(a.job): a.job for a, _ in batch.owners}.values()), e)
                batch = None
                continue
            batch = self._retire(batch)

    def _admit(self, batch: Batch | None) -> list[Job] | None:
        """Jobs that join before the next step (waiting for one while nothing runs); None: closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or (batch and batch.owners) or self._closed)
            if self._closed:
                return None
            rows = len(batch.owners) if batch else 0
            key = batch.key if batch and batch.owners else None
            out = []
            while self._queue:
                job = self._queue[0]
                fits = rows == 0 or rows + len(job.prompts) <= self.max_batch
                if not fits or (key is not None and batch_key(job) != key):
                    break  # first come, first served: nothing overtakes the head of the queue
                out.append(self._queue.popleft())
                self.running.append(job)
                rows += len(job.prompts)
                key = batch_key(job)
            return out

    def _join(self, batch: Batch | None, jobs: list[Job]) -> Batch | None:
        """Prefill `jobs` into the batch (a new one if none runs) in one forward; if the engine
        refuses that (a prompt too long for the context, ...), each job joins alone, so only the
        job at fault gets the error."""
        self._forget([j for j in jobs if j.cancelled])
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return batch
        if batch is None or not batch.owners:
            try:
                batch = Batch(Decoder(self.runtime.model, jobs[0].gen, jobs[0].store), batch_key(jobs[0]))
            except Exception as e:  # noqa: BLE001 - options the engine refuses: the requests' error
                self._fail(jobs, e)
                return None
            batch.decoder.open()
        try:
            self._prefill(batch, jobs)
        except Exception as e:  # noqa: BLE001 - reported to the request(s) at fault
            if len(jobs) == 1 or not isinstance(e, GenerationError):
                self._fail(jobs, e)
                return batch
            for job in jobs:
                try:
                    self._prefill(batch, [job])
                except Exception as e1:  # noqa: BLE001
                    self._fail([job], e1)
        return batch

    def _prefill(self, batch: Batch, jobs: list[Job]) -> None:
        prompts = [p for job in jobs for p in job.prompts]
        first = batch.decoder.join(prompts, [job.gen.max_new_tokens for job in jobs for _ in job.prompts])
        row = len(batch.owners)
        for job in jobs:
            on_text = (lambda i, text, job=job: job.put("text", i, text)) if job.stream else None
            act = Active(job, StreamedTexts(self.runtime.tokenizer, job.stop, len(job.prompts), on_text),
                         [[] for _ in job.prompts], [None] * len(job.prompts))
            batch.owners += [(act, k) for k in range(len(job.prompts))]
            job.put("start")  # the prefill is done: a stream's headers go out now
            self.observer.on_first_token(time.monotonic() - job.arrived)
        self._commit(batch, {row + k: toks for k, toks in enumerate(first)})

    def _step(self, batch: Batch) -> None:
        emitted = batch.decoder.step()
        self.observer.on_step(self._commit(batch, dict(enumerate(emitted))))

    def _commit(self, batch: Batch, emitted: dict[int, list[int]]) -> int:
        """Append each row's new tokens to its job; a row that completed a stop string ends there.
        Returns the number of tokens kept."""
        kept, st = 0, batch.decoder.state
        for r, toks in emitted.items():
            act, k = batch.owners[r]
            if not toks or act.job.cancelled:
                continue
            keep = act.texts.push(k, toks)
            if keep is not None:
                toks = toks[:keep]
                st.done[r] = True  # as `generate`'s on_tokens: the engine stops this sequence
            act.seqs[k].extend(toks)
            kept += len(toks)
        return kept

    def _retire(self, batch: Batch) -> Batch | None:
        """Rows that are done or cancelled leave the batch; jobs whose rows are all done report."""
        st, gone, done = batch.decoder.state, [], []
        if st is None:  # every job failed to join
            return None
        for r, (act, k) in enumerate(batch.owners):
            if act.job.cancelled or act.job.finished or st.done[r]:
                gone.append(r)
                act.stats[k] = {**st.row_stats[r].as_dict(), "wall_s": round(time.perf_counter() - act.joined, 4)}
                if act.finished and not act.job.cancelled and not act.job.finished:
                    done.append((act, st.row_stats[r]))
        if not gone:
            return batch
        batch.decoder.leave(gone)
        batch.owners = [o for r, o in enumerate(batch.owners) if r not in set(gone)]
        live = {id(a.job) for a, _ in batch.owners}
        with self._cond:
            self.running = [j for j in self.running if id(j) in live]
            self._cond.notify_all()
        self.observer.on_batch(self.running_batch)
        for act, stats in done:  # answered last, so a client that reads /metrics next sees the batch without it
            self._finish(act, stats)
        return batch if batch.owners else None

    def _finish(self, act: Active, stats: GenerationStats) -> None:
        job = act.job
        self.observer.on_finished(stats)
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - act.joined)
        results = act.texts.results(act.seqs, {}, set(self.runtime.eos_ids))
        for r, stats_k in zip(results, act.stats, strict=True):
            r.stats = stats_k
        if job.learn and job.store is not None:
            for r in results:
                job.store.learn(r.tokens)
        _report(job, "done", results)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            _report(job, "error", error)
        self._forget(jobs)

    def _forget(self, jobs: list[Job]) -> None:
        """These jobs are out of the batch (failed, or cancelled before they joined)."""
        with self._cond:
            gone = {id(j) for j in jobs}
            self.running = [j for j in self.running if id(j) not in gone]
            self._cond.notify_all()
        self.observer.on_batch(self.running_batch)


def _report(job: Job, *event: Any) -> None:
    """The job's outcome, once; a cancelled job's request was already answered."""
    if job.cancelled or job.finished:
        return
    job.finished = True
    job.put(*event)
