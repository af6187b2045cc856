"""The serving side of batched decoding: ``Batcher``, one worker thread that keeps a batch of rows
decoding (``prlhf.sampling.DecodeBatch``) and lets requests join it between tokens (continuous
batching); each request's rows report their text, their end or their error to the request's event
queue (``Job``). ``prlhf serve`` is its user; it has no web framework in it."""

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from .sampling import DecodeBatch, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class Job:
    prompt: object
    user: str | None
    user_text: str | None
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """One worker thread that decodes queued rows together (``prlhf.sampling.DecodeBatch``). With
    ``continuous`` (the default) rows join the running batch between tokens as others finish, up to
    ``max_batch_size`` live rows; a new batch waits at most ``batch_wait_ms`` for companions of its
    first row. Without, a batch runs to its end before the next starts."""

    def __init__(self, model, max_batch_size: int = 16, batch_wait_ms: float = 5.0, continuous: bool = True):
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.continuous = continuous
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0  # decode batches started (a new one when the previous one emptied)
        self.rows = 0
        self.joined = 0  # rows that joined a batch already decoding
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prlhf-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def close(self) -> None:
        self._stop.set()
        self.queue.put(None)

    def _take(self, jobs: list, limit: int, wait: bool) -> list:
        """More queued jobs, up to ``limit`` in all: waiting until ``batch_wait`` after now when
        ``wait``, else only those already queued."""
        deadline = time.monotonic() + (self.batch_wait if wait else 0.0)
        while len(jobs) < limit:
            left = deadline - time.monotonic()
            try:
                nxt = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._stop.set()
                break
            jobs.append(nxt)
        return [j for j in jobs if not j.cancelled.is_set()]

    def _run(self) -> None:
        decode, live = None, {}  # the running batch; id(row) -> its job
        while not self._stop.is_set():
            if decode is None or not len(decode):
                job = self.queue.get()
                if job is None:
                    break
                jobs = self._take([job], self.max_batch_size, wait=True)
                if not jobs:
                    continue
                decode, live = DecodeBatch(self.model), {}
                self.batches += 1
                self._add(decode, jobs, live)
            elif self.continuous and decode.can_join and len(decode) < self.max_batch_size:
                jobs = self._take([], self.max_batch_size - len(decode), wait=False)
                if jobs:
                    self.joined += len(jobs)
                    self._add(decode, jobs, live)
            if decode is None or not len(decode):
                continue
            try:
                finished = decode.step()
            except Exception as err:  # noqa: BLE001 - the batch's requests fail, the server lives on
                logger.exception("generation failed")
                self._fail(list(live.values()), err)
                decode, live = None, {}
                continue
            for row in finished:
                self._emit(live.pop(id(row)), ("done", row.out))

    def _add(self, decode, jobs: list[Job], live: dict) -> None:
        self.rows += len(jobs)
        try:
            rows = decode.add([j.prompt for j in jobs], [j.user for j in jobs], [j.user_text for j in jobs],
                              [j.params for j in jobs],
                              on_text=[(lambda text, j=j: self._emit(j, ("text", text))) for j in jobs],
                              is_cancelled=[j.cancelled.is_set for j in jobs])
        except Exception as err:  # noqa: BLE001 - these requests fail; rows already decoding go on
            logger.exception("generation failed")
            self._fail(jobs, err)
            return
        for j, row in zip(jobs, rows):
            if row.out.finish_reason is not None:  # nothing to decode (max_tokens 0)
                self._emit(j, ("done", row.out))
            else:
                live[id(row)] = j

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        for j in jobs:
            self._emit(j, ("error", err))

    def _emit(self, job: Job, event) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, event)
