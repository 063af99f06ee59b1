"""A serving loop: one thread owns the model and a Scheduler and steps the batch; any thread may submit and cancel
requests, or hand it other work on the model to run between two steps (`call`: a quick function; `submit_work`: a
long job cut into slices, such as a traced pass for inspection).

The Scheduler is not thread-safe, so only the loop's own thread calls its submit / step / finish. Other threads
(an HTTP server's event loop, say) hand requests and cancellations over through a locked inbox, and each request's
events come back through the callback given with it, called on the serving thread: a `TokenEvent` per token, then
the `GenerationResult` when the request ends (for any reason, cancellation included), or an `EngineError` instead
when the scheduler refused it (a `StepFailedError` when a fault in its own step ended it: its neighbours in the
batch go on). A callback must be quick and must not block: it hands the item to the submitter's own queue. Nothing
here knows about HTTP.

Sliced work (`submit_work`) shares the thread with the batch without stalling it: each batched step earns sliced
work WORK_SHARE of its time, and between two steps a job runs one slice of at most what was earned and about that
share of a step (the job sizes its pieces to fit; a slice that overran is paid back by skipping steps), so sliced
work takes about WORK_SHARE of the serving thread beside decoding, and a stream's time between tokens grows by one
slice at most; with nothing decoding a slice is IDLE_SLICE_SECONDS. Jobs take turns. Cancelling its Future drops a
job before its next slice.

`submit_choices` runs n continuations of one prompt (OpenAI's n) with one prefill (Scheduler.fork); choice i
samples with `choice_options(options, i)`: the request's seed + i, as vLLM does. With `prefix_cache_bytes` > 0 the
loop's Scheduler shares a PrefixCache of that size: every request starts from the longest cached prefix of its
prompt. Each choice takes a place in the batch (`max_active`) and in the queue: n > max_active can never run and is
refused at once (`NeverFitsError`).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Callable

from engine.errors import EngineError
from engine.generation.scheduler import Request, Scheduler
from engine.generation.speculative import LOOKUP, check_draft, split_draft
from engine.generation.state import GenerationOptions
from engine.runtime.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

EventCallback = Callable[[object], None]
PREFILL_SHARE = 2.0  # prompt tokens beside decoding sequences: about twice a decode step's time (Scheduler)
DEFAULT_PREFIX_CACHE_MB = 1024  # the server's prefix cache: ~23,000 tokens of TinyLlama's KV (45 KB a token)
WORK_SHARE = 0.5  # a sliced job's slice between two batched steps, as a share of a step's time
IDLE_SLICE_SECONDS = 0.1  # a slice when nothing decodes (the loop reads its inbox between two slices)
STEP_TIME_WEIGHT = 0.2  # the weight of the latest step in the running average of a step's time


class QueueFullError(EngineError):
    """max_active requests are running and max_queue more are waiting: try again later."""


class ServingStoppedError(EngineError):
    """The serving loop is stopping or stopped: it takes no more requests."""


class StepFailedError(EngineError):
    """A fault in the request's own part of a batched step (an engine bug, logged with its traceback) ended it; the
    other requests in the batch went on."""


class NeverFitsError(EngineError):
    """The request asks for more sequences at once (n choices) than the batch ever holds: retrying cannot help."""


@dataclass(eq=False)
class _Work:
    """A sliced job on the serving thread: `run_slice(seconds) -> finished?`, then `result()`."""

    job: object
    future: Future


@dataclass(eq=False)
class Ticket:
    """A submitted request as its submitter sees it: the id to cancel it by, and (on the serving thread) its Request."""

    id: int
    prompt_ids: list[int]
    options: GenerationOptions
    on_event: EventCallback
    request: Request | None = field(default=None, repr=False)
    done: bool = False
    forks: list["Ticket"] = field(default_factory=list, repr=False)  # more choices sharing this one's prefill
    cache_salt: object = None  # the prefix cache partition (Scheduler.submit)


def choice_options(options: GenerationOptions, index: int) -> GenerationOptions:
    """The options of choice `index` of an n > 1 request: its seed is the request's seed + index (mod 2**64), so
    every choice draws its own tokens and a seeded request is reproducible; without a seed each draws fresh."""
    seed = options.sampling.seed
    if seed is None or index == 0:
        return options
    return replace(options, sampling=replace(options.sampling, seed=(seed + index) % 2 ** 64))


class ServingLoop:
    """Runs a Scheduler on its own thread. `submit` / `cancel` / `cancel_all` / `stop` are safe from any thread.

    max_active: sequences in the batch at once; max_queue: more requests that may wait for a place, beyond which
    `submit` raises QueueFullError. speculate / draft: speculative decoding for every request (Scheduler.submit); the
    draft forwards of all requests in a step are batched. prefix_cache_bytes: the PrefixCache's size (0: none;
    also none on a backend whose caches are not host float32 arrays). prefill_share: the Scheduler's (prompt
    tokens beside decoding sequences held to about that share of a decode step's time; None: prefill_chunk only).
    """

    def __init__(self, model, max_active: int = 32, max_queue: int = 256, prefill_chunk: int = 256,
                 speculate: int = 0, draft=LOOKUP, prefix_cache_bytes: int = 0,
                 prefill_share: float | None = PREFILL_SHARE):
        if max_queue < 0:
            raise EngineError(f"max_queue must be >= 0, got {max_queue}")
        if isinstance(speculate, bool) or not isinstance(speculate, int) or speculate < 0:
            raise EngineError(f"speculate must be an integer >= 0, got {speculate!r}")
        check_draft(draft)
        self.model = model
        self.prefix_cache = (PrefixCache.for_model(model, prefix_cache_bytes)
                             if prefix_cache_bytes > 0 and PrefixCache.usable(model.new_cache()) else None)
        self.scheduler = Scheduler(model, prefill_chunk=prefill_chunk, max_active=max_active,
                                   prefix_cache=self.prefix_cache, prefill_share=prefill_share)
        self.speculate, self.draft = speculate, draft  # every request's speculative decoding
        model_draft, _ = split_draft(draft)  # "int8+lookup": the int8 copy drafts where lookup finds nothing
        if speculate and model_draft != LOOKUP:
            self.scheduler.drafter(model_draft)  # load the draft model now, not inside the first request
        self.max_active = max_active
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[tuple[str, object]] = deque()  # (kind, Ticket | (fn, Future) | None)
        self._ids = itertools.count()
        self._in_flight = 0  # submitted and not yet ended (running + waiting)
        self._stopping = False
        self._tickets: dict[int, Ticket] = {}  # serving thread only: request id -> ticket
        self._thread: threading.Thread | None = None
        self.running = 0  # sequences in the batch, as of the last step (read from any thread)
        self.waiting = 0  # requests submitted but not yet in the batch
        self.kv_tokens = 0  # tokens held in the KV caches of the sequences in the batch, as of the last step
        self.steps = 0  # batched forwards run so far
        self.step_seconds = 0.0  # running average of a batched step's time (serving thread)
        self._work_credit = 0.0  # seconds of sliced work the steps have earned (serving thread)
        self._works: deque[_Work] = deque()  # sliced jobs, taking turns (serving thread)
        self.works = 0  # sliced jobs submitted and not yet ended (read from any thread)

    # ---- any thread -------------------------------------------------------------------------------------------
    def start(self) -> "ServingLoop":
        """Start the serving thread (a daemon: it never keeps a process alive on its own)."""
        self._thread = threading.Thread(target=self._run, name="tinyllama-serving", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], options: GenerationOptions, on_event: EventCallback,
               cache_salt=None) -> Ticket:
        """Queue a request; on_event(item) is called on the serving thread for each of its events.

        Raises QueueFullError when max_active + max_queue requests are already in flight, ServingStoppedError after
        `stop`. Validate the prompt (check_prompt) and options before: errors found on the serving thread arrive as
        an EngineError event. cache_salt: the request's prefix cache partition (None: the shared one).
        """
        return self.submit_choices(prompt_ids, [options], [on_event], cache_salt)[0]

    def submit_choices(self, prompt_ids: list[int], options: list[GenerationOptions],
                       on_event: list[EventCallback], cache_salt=None) -> list[Ticket]:
        """Queue len(options) continuations of one prompt that share one prefill (see `submit`) -> their tickets.

        Each is cancelled on its own; they count as that many requests against max_active + max_queue, and enter
        the batch together: NeverFitsError when they are more than max_active."""
        return self.submit_groups([(prompt_ids, options, on_event)], cache_salt)[0]

    def submit_groups(self, groups: list[tuple[list[int], list[GenerationOptions], list[EventCallback]]],
                      cache_salt=None) -> list[list[Ticket]]:
        """Queue several prompts at once (a completions request's list), each with its choices as in
        `submit_choices` -> each group's tickets. All are admitted or none: QueueFullError when they do not all fit
        in max_active + max_queue beside the requests in flight; NeverFitsError when they never could (a group of
        more than max_active choices, or more sequences in all than max_active + max_queue)."""
        n = sum(len(options) for _, options, _ in groups)
        largest = max(len(options) for _, options, _ in groups)
        if largest > self.max_active:
            raise NeverFitsError(f"{largest} choices of one prompt run together, and this server runs at most "
                                 f"{self.max_active} sequences at once")
        if n > self.max_active + self.max_queue:
            raise NeverFitsError(f"{n} sequences in one request, and this server holds at most "
                                 f"{self.max_active + self.max_queue} at once (running and waiting)")
        with self._lock:
            if self._stopping:
                raise ServingStoppedError("the server is shutting down")
            if self._in_flight + n > self.max_active + self.max_queue:
                raise QueueFullError(f"the server is busy: {self.max_active} sequences running and {self.max_queue} "
                                     "waiting; try again shortly")
            self._in_flight += n
            out = []
            for prompt_ids, options, on_event in groups:
                tickets = [Ticket(next(self._ids), list(prompt_ids), o, cb, cache_salt=cache_salt)
                           for o, cb in zip(options, on_event)]
                tickets[0].forks = tickets[1:]
                self._inbox.append(("submit", tickets[0]))
                out.append(tickets)
            self.waiting += n
            self._wake.notify()
        return out

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the serving thread between two batched steps, so it has the model to itself (a traced forward
        pass, say) -> a Future of its result (or its exception). The batch waits while it runs.

        Raises ServingStoppedError after `stop`.
        """
        future: Future = Future()
        with self._lock:
            if self._stopping:
                raise ServingStoppedError("the server is shutting down")
            self._inbox.append(("call", (fn, future)))
            self._wake.notify()
        return future

    def submit_work(self, job) -> Future:
        """Run a sliced job on the serving thread between batched steps -> a Future of its result (or exception).

        job.run_slice(seconds) works for about that long (at least one smallest piece) and returns whether it has
        finished; then job.result() is the Future's result (see the module docstring for the seconds). Cancel the Future to drop the job before its next slice. Raises
        ServingStoppedError after `stop`.
        """
        future: Future = Future()
        with self._lock:
            if self._stopping:
                raise ServingStoppedError("the server is shutting down")
            self._inbox.append(("work", _Work(job, future)))
            self.works += 1
            self._wake.notify()
        return future

    def cancel(self, ticket: Ticket) -> None:
        """End a request now (stop reason 'cancelled'; its cache is freed); a no-op once it has ended."""
        with self._lock:
            self._inbox.append(("cancel", ticket))
            self._wake.notify()

    def cancel_all(self) -> None:
        """Cancel every request in flight (a shutdown that will not wait for them)."""
        with self._lock:
            self._inbox.append(("cancel_all", None))
            self._wake.notify()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Take no more requests, cancel those in flight (each gets its final result), and end the thread."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the serving thread was started and still runs (False once stopped, or if it died)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet ended."""
        return self._in_flight

    # ---- the serving thread -----------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Whether nothing is running, waiting or sliced (read from any thread: a hint, not a lock)."""
        return not self._inbox and not self.scheduler.has_work and not self.works

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._inbox and not self.scheduler.has_work and not self._works and not self._stopping:
                    self._wake.wait()
                commands = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            for kind, ticket in commands:
                if kind == "submit":
                    self._admit(ticket)
                elif kind == "cancel":
                    self._cancel(ticket)
                elif kind == "call":
                    self._run_call(*ticket)
                elif kind == "work":
                    self._works.append(ticket)
                else:
                    for t in list(self._tickets.values()):
                        self._cancel(t)
            if stopping:
                for t in list(self._tickets.values()):
                    self._cancel(t)
                for work in self._works:
                    self._end_work(work, error=ServingStoppedError("the server is shutting down"))
                self._works.clear()
                self._count()
                return
            if self.scheduler.has_work:
                started = time.perf_counter()
                try:
                    stepped = self.scheduler.step()
                except Exception as error:  # noqa: BLE001 - an engine bug outside any one sequence: fail the batch
                    log.exception("a batched step failed; ending the requests in it")
                    self._fail_all(error)
                    stepped = []
                elapsed = time.perf_counter() - started
                self.step_seconds += STEP_TIME_WEIGHT * (elapsed - self.step_seconds) if self.steps else elapsed
                self._work_credit = min(self._work_credit + WORK_SHARE * elapsed, WORK_SHARE * self.step_seconds)
                self.steps += 1
                for request in stepped:
                    self._deliver(self._tickets.get(request.id))
            if self._works:
                self._run_slice()
            self._count()

    def _run_slice(self) -> None:
        """One slice of the sliced job whose turn it is (see the module docstring); a cancelled one is dropped."""
        work = self._works.popleft()
        if work.future.cancelled():
            self._end_work(work)
            return
        if self.scheduler.has_work:
            if self._work_credit <= 0:  # the last slice overran: the steps pay it back first
                self._works.appendleft(work)
                return
            budget = self._work_credit
        else:
            budget = IDLE_SLICE_SECONDS
        started = time.perf_counter()
        try:
            finished = work.job.run_slice(budget)
        except BaseException as error:  # noqa: BLE001 - handed to the caller, who waits on the future
            self._end_work(work, error=error)
            return
        finally:
            if self.scheduler.has_work:
                self._work_credit -= time.perf_counter() - started
        if not finished:
            self._works.append(work)  # its next turn after the others'
            return
        try:
            result = work.job.result()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            self._end_work(work, error=error)
            return
        self._end_work(work, result=result)

    def _end_work(self, work: _Work, result=None, error: BaseException | None = None) -> None:
        with self._lock:
            self.works -= 1
        if work.future.set_running_or_notify_cancel():  # False: cancelled, nobody waits
            if error is not None:
                work.future.set_exception(error)
            else:
                work.future.set_result(result)

    @staticmethod
    def _run_call(fn: Callable[[], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as error:  # noqa: BLE001 - handed to the caller, who waits on the future
            future.set_exception(error)

    def _admit(self, ticket: Ticket) -> None:
        try:
            ticket.request = self.scheduler.submit(ticket.prompt_ids, ticket.options, speculate=self.speculate,
                                                   draft=self.draft, cache_salt=ticket.cache_salt)
            for fork in ticket.forks:
                fork.request = self.scheduler.fork(ticket.request, fork.options)
        except EngineError as error:
            for t in [ticket] + ticket.forks:
                if t.request is not None:
                    self.scheduler.finish(t.request, cancelled=True)
                self._end(t, error)
            return
        for t in [ticket] + ticket.forks:
            self._tickets[t.request.id] = t

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.done or ticket.request is None:
            return  # ended already, or refused at submit (then it has had its EngineError)
        ticket.request.cancel()
        self._deliver(ticket)

    def _deliver(self, ticket: Ticket | None) -> None:
        """Hand the request's queued TokenEvents to its callback, then its result if it has finished."""
        if ticket is None or ticket.done:
            return
        request = ticket.request
        while request.events:
            self._call(ticket, request.events.popleft())
        if request.finished:
            self._tickets.pop(request.id, None)
            if request.error is not None:
                self._end(ticket, StepFailedError(f"internal error in this request's step: "
                                                  f"{type(request.error).__name__}"))
            else:
                self._end(ticket, request.result)

    def _end(self, ticket: Ticket, item) -> None:
        ticket.done = True
        with self._lock:
            self._in_flight -= 1
        self._call(ticket, item)

    def _fail_all(self, error: Exception) -> None:
        failure = StepFailedError(f"internal error in the batched step: {type(error).__name__}")
        for ticket in list(self._tickets.values()):
            self.scheduler.finish(ticket.request, cancelled=True, reusable=False)
            self._tickets.pop(ticket.request.id, None)
            self._end(ticket, failure)

    @staticmethod
    def _call(ticket: Ticket, item) -> None:
        try:
            ticket.on_event(item)
        except Exception:  # noqa: BLE001 - a broken callback must not take the batch down
            log.exception("an event callback failed (request %d)", ticket.id)

    def _count(self) -> None:
        with self._lock:
            pending = sum(1 + len(t.forks) for kind, t in self._inbox if kind == "submit")
            self.running = len(self.scheduler.active)
            self.kv_tokens = sum(r.cache.length for r in self.scheduler.active if r.cache is not None)
            self.waiting = len(self.scheduler.waiting) + pending
