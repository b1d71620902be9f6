"""The continuous-batching loop of the server: one background thread owns the generation engine.

HTTP handlers (asyncio) :meth:`Scheduler.submit` jobs and read their :class:`Event` s from an
``asyncio.Queue``; the thread admits waiting jobs into free rows of the running batch between decode steps
(prefill), decodes one token for every active row per step, hands each job its new text, and frees a row as
soon as its job finishes or is cancelled (a client that went away). Nothing but this thread touches the engine.

Counters (:meth:`Scheduler.stats`, served at ``GET /metrics``) show what really happened, e.g.
``max_active_batch``: the most requests that ever decoded in one step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from litft.generate.engine import Engine, Request, TokenLogprob
from litft.generate.sampling import SamplingParams

log = logging.getLogger("litft.serve")


class QueueFull(RuntimeError):
    """The waiting queue cannot take the jobs (the server answers 503)."""


class SchedulerStopped(RuntimeError):
    """The scheduler is shutting down and takes no new jobs (the server answers 503)."""


@dataclass
class Event:
    """What a job's queue receives: new ``text`` (and the new tokens' ``logprobs`` when the job asked for them)
    and, on the last event, ``finish_reason`` (``"stop"``, ``"length"``, ``"abort"`` when the server cancelled
    it) with the token counts, or an ``error`` message."""

    index: int  # the job's index within its HTTP request (the choice index)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Job:
    """One generation (one choice of one HTTP request) and the way back to its handler."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[Event]"
    logprobs: Optional[int] = None  # record logprobs with this many alternatives (Engine.new_request)
    request: Optional[Request] = None  # the engine's request, once admitted
    cancelled: bool = False
    done: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def _put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the handler's event loop is closed: nobody is listening any more
            pass


class Scheduler:
    """Runs ``engine`` in a background thread with up to ``max_batch_size`` requests decoding together and at
    most ``max_queue`` waiting for a free row.

    Args:
        engine: the generation engine (owned by the scheduler's thread from :meth:`start` to :meth:`stop`).
        max_batch_size: rows of the KV cache, i.e. the most requests that decode together.
        max_queue: the most jobs waiting for a row; :meth:`submit` raises :class:`QueueFull` beyond it.
    """

    def __init__(self, engine: Engine, max_batch_size: int = 32, max_queue: int = 256) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} is invalid: expected an integer >= 1")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} is invalid: expected an integer >= 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # engine request id -> job
        self._cancelled: list[Job] = []
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._deadline: Optional[float] = None  # set by drain(): abort what still runs at this time.monotonic()
        # steps: decode steps; batched_steps: steps that decoded more than one request; max_active_batch: the most
        # requests decoded in one step; requests_*: cancelled = client went away, aborted = cut by shutdown,
        # rejected = queue full or shutting down, failed = generation error
        self.counters: dict[str, int] = dict(
            steps=0, batched_steps=0, max_active_batch=0, requests_submitted=0, requests_completed=0,
            requests_cancelled=0, requests_aborted=0, requests_rejected=0, requests_failed=0, prompt_tokens=0,
            completion_tokens=0,
        )

    # ------------------------------------------------------------------ handler side (any thread)

    def start(self) -> None:
        """Allocate the KV cache (``max_batch_size`` rows × the engine's ``max_seq_length`` slots), warm the engine
        up (:meth:`Engine.warm_up`) and start the thread: once this returns, a request is served at once."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already running")
        self.engine.allocate(self.max_batch_size, self.engine.max_seq_length)
        self.engine.warm_up()
        self._stopping = False
        self._deadline = None
        self._thread = threading.Thread(target=self._loop, name="litft-serve-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is still waiting or running (each job gets a final ``"abort"`` event) and join the thread."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the scheduler thread did not stop within %.0f s", timeout)
            self._thread = None

    def drain(self, timeout: float) -> None:
        """Shutting down: take no new jobs, let the current ones run for up to ``timeout`` seconds, then end them
        with finish reason ``"abort"`` (their clients get a well-formed, truncated answer)."""
        with self._lock:
            deadline = time.monotonic() + max(timeout, 0.0)
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._wake.notify_all()

    @property
    def running(self) -> bool:
        """Started, and neither stopping nor draining."""
        return (self._thread is not None and self._thread.is_alive() and not self._stopping
                and self._deadline is None)

    def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
               logprobs: Optional[int] = None) -> "tuple[list[Job], asyncio.Queue[Event]]":
        """Queue one job per prompt (all or none); call from the handler's event loop. Returns the jobs and the
        queue their events arrive on (tagged with the job's index in ``prompts``). With ``logprobs``, events
        carry each token's logprob and that many alternatives."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        jobs = [Job(i, list(ids), p, loop, queue, logprobs) for i, (ids, p) in enumerate(zip(prompts, params))]
        with self._lock:
            if self._stopping or self._thread is None or self._deadline is not None:
                self.counters["requests_rejected"] += len(jobs)
                raise SchedulerStopped("the server is shutting down")
            # jobs beyond the free rows wait in the queue
            free = self.max_batch_size - len(self._running)
            if len(self._waiting) + len(jobs) - free > self.max_queue:
                self.counters["requests_rejected"] += len(jobs)
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting for one of "
                                f"{self.max_batch_size} rows (max_queue={self.max_queue}); retry later")
            self._waiting.extend(jobs)
            self.counters["requests_submitted"] += len(jobs)
            self._wake.notify_all()
        return jobs, queue

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Cancel jobs whose client went away: their rows are freed before the next decode step."""
        with self._lock:
            for job in jobs:
                if not job.done and not job.cancelled:
                    job.cancelled = True
                    self._cancelled.append(job)
            self._wake.notify_all()

    def stats(self) -> dict[str, Any]:
        """Counters plus the current ``active_rows`` and ``queued`` jobs."""
        with self._lock:
            return dict(self.counters, active_rows=len(self._running), queued=len(self._waiting),
                        max_batch_size=self.max_batch_size, max_queue=self.max_queue,
                        max_seq_length=self.engine.max_seq_length)

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._running or self._cancelled):
                    self._wake.wait()
                if self._stopping:
                    break
                overdue = self._deadline is not None and time.monotonic() >= self._deadline
                cancelled, self._cancelled = self._cancelled, []
                free = self.max_batch_size - len(self._running)
                joining = [] if overdue else [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            if overdue:  # draining for shutdown and out of time
                self._abort_all()
                continue
            try:
                self._drop(cancelled)
                joining = [job for job in joining if not job.cancelled]
                if joining:
                    self._admit(joining)
                    self._deliver()  # first tokens out at once; rows that already finished are freed
                if self._running:
                    self._step()
            except Exception as e:  # noqa: BLE001 - report to every client, keep serving
                log.exception("generation failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._abort_all()

    def _drop(self, cancelled: list[Job]) -> None:
        for job in cancelled:
            if job.done:
                continue
            job.done = True
            if job.request is not None:
                self.engine.remove(job.request)
                self._running.pop(job.request.id, None)
            else:
                with self._lock:
                    if job in self._waiting:
                        self._waiting.remove(job)
            self.counters["requests_cancelled"] += 1

    def _admit(self, joining: list[Job]) -> None:
        requests = []
        for job in joining:
            try:
                job.request = self.engine.new_request(job.prompt_ids, job.params, logprobs=job.logprobs)
            except ValueError as e:  # the handler validated it already; fail this job only
                job.done = True
                self.counters["requests_failed"] += 1
                job._put(Event(job.index, error=str(e)))
                continue
            requests.append(job.request)
            with self._lock:
                self._running[job.request.id] = job
        self.engine.add(requests)
        self.counters["max_active_batch"] = max(self.counters["max_active_batch"], len(self._running))

    def _step(self) -> None:
        """Decode up to ``engine.sync_every`` steps (1 on CPU, 8 on accelerators: fewer host syncs, same results; a
        stop token is noticed a few steps later), then hand out text and free finished rows."""
        engine = self.engine
        for i in range(engine.sync_every):
            live = _live(engine)
            # a row that has sampled its last token must be synced and freed before the next step: the cache may
            # have to shift, and a finished row would still hold its slots
            if not live or len(live) < len(engine.active_requests()):
                break
            engine.step()
            self.counters["steps"] += 1
            if len(live) > 1:
                self.counters["batched_steps"] += 1
            self.counters["max_active_batch"] = max(self.counters["max_active_batch"], len(live))
            if self._cancelled or (self._waiting and len(self._running) < self.max_batch_size):
                break  # let cancellations and joiners in without waiting for the whole window
        self._deliver()

    def _deliver(self) -> None:
        """Sync sampled tokens to the host, send every job its new text, free the rows of finished jobs."""
        self.engine.sync()
        for job in list(self._running.values()):
            request = job.request
            text, logprobs = request.take_text(), request.take_logprobs()
            if request.finished:
                self._finish(job)
                job._put(Event(job.index, text, logprobs, finish_reason=request.finish_reason,
                               prompt_tokens=len(request.prompt_ids), completion_tokens=request.num_generated))
            elif text or logprobs:
                job._put(Event(job.index, text, logprobs))

    def _finish(self, job: Job) -> None:
        request = job.request
        self.engine.remove(request)
        with self._lock:
            self._running.pop(request.id, None)
            job.done = True
            self.counters["requests_completed"] += 1
            self.counters["prompt_tokens"] += len(request.prompt_ids)
            self.counters["completion_tokens"] += request.num_generated

    def _fail_all(self, message: str) -> None:
        with self._lock:
            jobs = list(self._running.values()) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
            self.counters["requests_failed"] += len(jobs)
        for job in jobs:
            job.done = True
            job._put(Event(job.index, error=message))
        for request in self.engine.active_requests():
            try:
                self.engine.remove(request)
            except Exception:  # noqa: BLE001 - the engine is already broken; free what can be freed
                log.exception("could not free a row after a failure")

    def _abort_all(self) -> None:
        """End everything still running or waiting with finish reason ``"abort"`` (shutting down)."""
        with self._lock:
            jobs = list(self._running.values()) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
        for job in jobs:
            if job.request is not None and not job.done:
                try:
                    self.engine.remove(job.request)
                except Exception:  # noqa: BLE001
                    log.exception("could not free a row at shutdown")
            if not job.done:
                job.done = True
                self.counters["requests_aborted"] += 1
                prompt = len(job.request.prompt_ids) if job.request else len(job.prompt_ids)
                generated = job.request.num_generated if job.request else 0
                job._put(Event(job.index, job.request.take_text() if job.request else "",
                               job.request.take_logprobs() if job.request else [], finish_reason="abort",
                               prompt_tokens=prompt, completion_tokens=generated))


def _live(engine: Engine) -> list[Request]:
    """Active requests that still have tokens to sample (the rows the next :meth:`Engine.step` decodes)."""
    return [r for r in engine.active_requests() if not r.finished and r._dispatched < r.params.max_new_tokens]
