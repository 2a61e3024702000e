"""The thread that runs the model: a bounded queue of waiting requests in front of a `ContinuousBatcher`.

Between two decode steps the waiting requests take the free rows (each prefilled alone, up to `max_len` prompt
tokens per step so a burst of long prompts cannot stall the running rows for long); then every running row
decodes one token. Tokens reach their requests through `Job.deliver`, called on this thread.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from ..engine.batching import BatchRequest, ContinuousBatcher

THROUGHPUT_WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is at its limit."""


@dataclass(eq=False)
class Job:
    """A request and where its output goes: `deliver(token)` per token, `deliver(None)` once it has finished
    (`request.finish_reason` says why), `deliver(error)` if the engine failed on it."""

    request: BatchRequest
    deliver: Callable[[int | None | Exception], None]


class BatchWorker:
    def __init__(self, batcher: ContinuousBatcher, max_queue: int):
        self.batcher, self.max_queue = batcher, max_queue
        self._waiting: deque[Job] = deque()
        self._running: dict[BatchRequest, Job] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llmdrop-rt batch worker", daemon=True)
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.prefill_seconds = 0.0  # time spent prefilling joining requests
        self.decode_seconds = 0.0  # time spent in decode steps, and the tokens they made
        self.decode_tokens = 0
        self.finished: Counter[str] = Counter()  # finished requests by finish_reason
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the recent steps

    def start(self):
        self._thread.start()

    def stop(self):
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job):
        """Queue a job (its size already checked with `batcher.check`); QueueFull when the queue is full."""
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._running)} requests running and "
                                f"{len(self._waiting)} waiting (the queue limit)")
            self._waiting.append(job)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= THROUGHPUT_WINDOW_S]
        return sum(n for _, n in recent) / THROUGHPUT_WINDOW_S

    def _loop(self):
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._admit()
                self._decode_step()
            except Exception as error:  # a failed step fails its rows, never the server
                for job in self._running.values():
                    job.deliver(error)
                self._running.clear()
                self.batcher.reset()
        for job in [*self._running.values(), *self._waiting]:
            job.request.cancel()
            job.deliver(None)

    def _admit(self):
        budget = self.batcher.max_len
        while self.batcher.free_rows and budget > 0:
            with self._wake:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if job.request.cancelled:
                job.request.finish_reason = "cancelled"
                self._finish(job)
                continue
            budget -= len(job.request.prompt)
            self.prompt_tokens += len(job.request.prompt)
            start = time.perf_counter()
            try:
                token = self.batcher.join(job.request)
            except Exception as error:
                job.deliver(error)
                continue
            finally:
                self.prefill_seconds += time.perf_counter() - start
            self._count(1)
            job.deliver(token)
            if job.request.finish_reason is None:
                self._running[job.request] = job
            else:
                self._finish(job)

    def _decode_step(self):
        if not self.batcher.rows:
            return
        start = time.perf_counter()
        emitted = self.batcher.step()
        self.decode_seconds += time.perf_counter() - start
        self.decode_tokens += len(emitted)
        self._count(len(emitted))
        for request, token in emitted:
            self._running[request].deliver(token)
        for request in [request for request in self._running if request.finish_reason is not None]:
            self._finish(self._running.pop(request))

    def _finish(self, job: Job):
        self.finished[job.request.finish_reason] += 1
        job.deliver(None)

    def _count(self, tokens: int):
        self.generated_tokens += tokens
        now = time.monotonic()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
            self._recent.popleft()
