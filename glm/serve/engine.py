"""One generation worker thread that batches queued requests into the static-batch generator.

HTTP handlers (on the asyncio loop) `submit` a `Job`; the worker takes up to `rows` waiting jobs, runs them
as one batch (each row with its own sampling settings, budget, seed and stop strings) and hands every
decoded text piece back to the job's asyncio queue. A job whose client went away is marked cancelled: its
row stops at its next token (or it is skipped if still waiting). The batch is static: jobs that arrive
while a batch runs wait for the next one.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from glm import GLMError
from glm.generate import GenerationConfig, Generator

# How long the worker waits after the first request for others to join its batch: concurrent clients
# rarely arrive in the same millisecond, and one prefill for all of them is far cheaper than several.
GATHER_SECONDS = 0.02


@dataclass
class Job:
    prompt: list[int]
    gen: GenerationConfig
    budget: int                      # new tokens this row may produce
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue            # ("text", str) ... then ("done", finish_reason) or ("error", message)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""                   # decoded text so far, cut at a stop string
    sent: int = 0                    # characters of `text` handed out
    stopped: bool = False            # a stop string ended it
    queued_at: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class QueueFull(Exception):
    pass


class Engine:
    def __init__(self, tokenizer, generator: Generator, max_queue: int):
        self.tok, self.generator = tokenizer, generator
        self.rows = generator.rows
        self.waiting: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="glm-generation", daemon=True)
        self.batches = 0            # batches run (for /health and the benchmark)
        self.busy_rows = 0
        self._running: list[Job] = []   # the batch the worker runs (close() cancels it after its timeout)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._closing.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting; retry later") from None

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, fail the waiting ones, let the running batch finish (or cancel it after `timeout`)."""
        self._closing.set()
        while True:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            job.emit("error", "the server is shutting down")
        self._thread.join(timeout)
        if self._thread.is_alive():
            for job in self._running:
                job.cancelled.set()
            self._thread.join(5)

    # -------------------------------------------------------------------------------- worker
    def _take_batch(self) -> list[Job]:
        try:
            first = self.waiting.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.perf_counter() + GATHER_SECONDS
        while len(batch) < self.rows:
            left = deadline - time.perf_counter()
            try:
                batch.append(self.waiting.get(timeout=left) if left > 0 else self.waiting.get_nowait())
            except queue.Empty:
                break
        return [j for j in batch if not j.cancelled.is_set()]

    def _run(self) -> None:
        while not self._closing.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            self._running = batch
            self.busy_rows = len(batch)
            try:
                self.generator.generate([j.prompt for j in batch], [j.gen for j in batch],
                                        streamer=lambda row, token, jobs=batch: self._on_token(jobs[row], token))
            except GLMError as e:
                for job in batch:
                    job.emit("error", str(e))
                continue
            except Exception as e:   # a bug must not kill the worker: the requests fail, the server lives
                for job in batch:
                    job.emit("error", f"internal error {type(e).__name__}: {e}")
                continue
            finally:
                self._running, self.busy_rows = [], 0
                self.batches += 1
            for job in batch:
                self._finish(job)

    def _on_token(self, job: Job, token: int) -> bool:
        """Decode, cut at a stop string, hand out what is safe to show. True ends the row."""
        if job.cancelled.is_set():
            return True
        job.tokens.append(token)
        text = self.tok.decode(job.tokens)
        if text.endswith("\ufffd"):         # half a character (byte-fallback pieces): wait for the rest
            return False
        for s in job.stops:
            cut = text.find(s, max(0, job.sent - len(s)))
            if cut >= 0:
                job.text, job.stopped = text[:cut], True
                self._flush(job, len(job.text))
                return True
        job.text = text
        # Keep back a tail that could still become a stop string.
        hold = max((k for s in job.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._flush(job, len(text) - hold)
        return False

    def _flush(self, job: Job, upto: int) -> None:
        if upto > job.sent:
            job.emit("text", job.text[job.sent:upto])
            job.sent = upto

    def _finish(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        self._flush(job, len(job.text))
        reason = "stop" if job.stopped or len(job.tokens) < job.budget else "length"
        job.emit("done", reason)
