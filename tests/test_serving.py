"""The serving loop (engine.generation.serving): one thread steps the Scheduler while other threads submit and cancel;
results equal plain generation, cancellation frees the sequence, a full queue and a failing step are reported."""
from __future__ import annotations

import queue
import threading
import time

import pytest

import engine
from engine.generation.serving import (NeverFitsError, QueueFullError, ServingLoop, ServingStoppedError,
                                       StepFailedError)
from engine.generation.state import GenerationResult, TokenEvent, default_options


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.conftest import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path_factory.mktemp("serving"), max_position_embeddings=128, seed=5)
    return engine.load_model(str(folder))


class Collector:
    """A request's events as the serving thread delivers them; `wait()` -> (token events, final item)."""

    def __init__(self):
        self.items: queue.Queue = queue.Queue()
        self.threads: set[str] = set()

    def __call__(self, item):
        self.threads.add(threading.current_thread().name)
        self.items.put(item)

    def wait(self, timeout: float = 60):
        events = []
        while True:
            item = self.items.get(timeout=timeout)
            if isinstance(item, TokenEvent):
                events.append(item)
            else:
                return events, item


@pytest.fixture
def loop(model):
    serving = ServingLoop(model, max_active=4, max_queue=2).start()
    yield serving
    serving.stop()


def test_requests_from_many_threads_equal_plain_generation(model, loop):
    prompts = [[1, 5, 9], [1, 7], list(range(3, 40)), [1, 2, 3, 4], [9, 9, 9]]
    kwargs = [dict(), dict(temperature=0.9, seed=3), dict(), dict(temperature=1.1, top_k=40, seed=8), dict()]
    collectors = [Collector() for _ in prompts]

    def submit(i):
        loop.submit(prompts[i], default_options(model, max_new_tokens=6 + i, ignore_eos=True, **kwargs[i]),
                    collectors[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, c in enumerate(collectors):
        events, result = c.wait()
        assert isinstance(result, GenerationResult) and result.stop_reason == "max_new_tokens"
        assert [e.token_id for e in events] == result.token_ids
        assert result.token_ids == model.generate(prompts[i], max_new_tokens=6 + i, ignore_eos=True, **kwargs[i])
        assert c.threads == {"tinyllama-serving"}  # callbacks run on the serving thread only
    assert loop.in_flight == 0 and loop.running == 0 and loop.waiting == 0


def test_cancel_frees_the_sequence_and_the_others_go_on(model, loop):
    long, short = Collector(), Collector()
    ticket = loop.submit([1, 2, 3], default_options(model, max_new_tokens=120, ignore_eos=True), long)
    loop.submit([4, 5], default_options(model, max_new_tokens=10, ignore_eos=True), short)
    first = long.items.get(timeout=30)
    assert isinstance(first, TokenEvent)
    loop.cancel(ticket)
    events, result = long.wait()
    assert result.stop_reason == "cancelled" and len(result.token_ids) < 120
    assert ticket.request.cache is None  # its KV cache is dropped at once
    _, other = short.wait()
    assert other.token_ids == model.generate([4, 5], max_new_tokens=10, ignore_eos=True)
    loop.cancel(ticket)  # cancelling an ended request is a no-op
    assert loop.in_flight == 0


def test_a_full_queue_refuses_and_recovers(model, loop):
    collectors = [Collector() for _ in range(6)]  # max_active 4 + max_queue 2
    tickets = [loop.submit([1, 2], default_options(model, max_new_tokens=100, ignore_eos=True), c)
               for c in collectors]
    with pytest.raises(QueueFullError, match="busy"):
        loop.submit([1, 2], default_options(model, max_new_tokens=5), Collector())
    for t in tickets:
        loop.cancel(t)
    for c in collectors:
        assert c.wait()[1].stop_reason == "cancelled"
    extra = Collector()
    loop.submit([1, 2], default_options(model, max_new_tokens=3, ignore_eos=True), extra)
    assert extra.wait()[1].stop_reason == "max_new_tokens"


def test_a_request_the_scheduler_refuses_gets_its_error(model, loop):
    c = Collector()
    loop.submit([1, 10_000], default_options(model, max_new_tokens=3), c)  # outside the 256-token vocabulary
    events, error = c.wait()
    assert events == [] and "vocabulary" in str(error)
    assert loop.in_flight == 0


def test_a_failing_step_ends_its_batch_and_the_loop_serves_on(model, monkeypatch):
    serving = ServingLoop(model).start()
    try:
        calls = []

        def broken(steps):
            calls.append(len(steps))
            raise RuntimeError("planted")

        monkeypatch.setattr(model, "forward", broken)
        c = Collector()
        serving.submit([1, 2, 3], default_options(model, max_new_tokens=4), c)
        _, error = c.wait()
        assert isinstance(error, StepFailedError) and calls
        monkeypatch.undo()
        ok = Collector()
        serving.submit([1, 2, 3], default_options(model, max_new_tokens=4, ignore_eos=True), ok)
        assert ok.wait()[1].token_ids == model.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
    finally:
        serving.stop()


def test_a_broken_callback_does_not_stop_the_loop(model, loop):
    def explode(item):
        raise ValueError("callback bug")

    loop.submit([1, 2], default_options(model, max_new_tokens=3), explode)
    c = Collector()
    loop.submit([1, 2], default_options(model, max_new_tokens=3, ignore_eos=True), c)
    assert c.wait()[1].stop_reason == "max_new_tokens"


def test_stop_cancels_what_is_in_flight(model):
    serving = ServingLoop(model).start()
    c = Collector()
    serving.submit([1, 2, 3], default_options(model, max_new_tokens=120, ignore_eos=True), c)
    c.items.get(timeout=30)
    serving.stop()
    assert c.wait()[1].stop_reason == "cancelled"
    with pytest.raises(ServingStoppedError):
        serving.submit([1, 2], default_options(model, max_new_tokens=3), Collector())


def test_call_runs_work_on_the_serving_thread_while_requests_decode(model, loop):
    import numpy as np

    collector = Collector()
    loop.submit([1, 5, 9], default_options(model, max_new_tokens=30, ignore_eos=True), collector)
    threads = []

    def work():  # a traced pass, as the inspection endpoints hand over
        threads.append(threading.current_thread().name)
        return model.trace([1, 5, 9, 2], attentions=True).attentions[0]

    got = loop.call(work).result(timeout=60)
    assert threads == ["tinyllama-serving"]
    np.testing.assert_array_equal(got, model.trace([1, 5, 9, 2], attentions=True).attentions[0])
    events, result = collector.wait()  # the request around it is unharmed
    assert result.token_ids == model.generate([1, 5, 9], max_new_tokens=30, ignore_eos=True)
    failing = loop.call(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=60)
    assert loop.call(lambda: "still serving").result(timeout=60) == "still serving"
    loop.stop()
    with pytest.raises(ServingStoppedError):
        loop.call(lambda: None)


# ---- issue 34: sliced work between steps, n that never fits, memory back after a burst -----------------------------
class SliceRecorder:
    """A sliced job of `slices` slices that notes the loop's step count and its budget at each, or raises at slice
    `fail_at`."""

    def __init__(self, loop, slices: int, fail_at: int | None = None):
        self.loop, self.slices, self.fail_at = loop, slices, fail_at
        self.steps_seen: list[int] = []
        self.budgets: list[float] = []

    def run_slice(self, seconds: float) -> bool:
        self.steps_seen.append(self.loop.steps)
        self.budgets.append(seconds)
        if len(self.steps_seen) == self.fail_at:
            raise ValueError("a planted job bug")
        return len(self.steps_seen) >= self.slices

    def result(self):
        return len(self.steps_seen)


def test_sliced_work_interleaves_with_decode_steps_and_can_be_cancelled(model, loop):
    c = Collector()
    loop.submit([1, 5, 9], default_options(model, max_new_tokens=100, ignore_eos=True), c)
    c.items.get(timeout=30)
    job = SliceRecorder(loop, slices=5)
    assert loop.submit_work(job).result(timeout=60) == 5
    assert all(b > a for a, b in zip(job.steps_seen, job.steps_seen[1:]))  # a batched step between two slices
    # about half a step's time each (the steps' running average): a fraction of a second on this model
    assert all(0 < b < 0.5 * max(loop.step_seconds, 1e-3) * 4 + 1 for b in job.budgets)
    endless = SliceRecorder(loop, slices=10 ** 9)
    future = loop.submit_work(endless)
    while len(endless.steps_seen) < 3:
        time.sleep(0.01)
    assert future.cancel()  # never started as far as the Future is concerned: it ends before its next slice
    wait_until(lambda: loop.works == 0)
    seen = len(endless.steps_seen)
    time.sleep(0.2)
    assert len(endless.steps_seen) == seen
    with pytest.raises(ValueError, match="planted"):
        loop.submit_work(SliceRecorder(loop, slices=5, fail_at=2)).result(timeout=60)
    _, result = c.wait()
    assert result.token_ids == model.generate([1, 5, 9], max_new_tokens=100, ignore_eos=True)


def test_choices_that_can_never_run_together_are_refused(model, loop):
    options = default_options(model, max_new_tokens=2)
    with pytest.raises(NeverFitsError, match="5 choices .* at most 4"):
        loop.submit_choices([1, 2], [options] * 5, [Collector() for _ in range(5)])
    assert loop.in_flight == 0
    collectors = [Collector() for _ in range(4)]
    loop.submit_choices([1, 2], [options] * 4, collectors)
    assert all(isinstance(c.wait()[1], GenerationResult) for c in collectors)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
