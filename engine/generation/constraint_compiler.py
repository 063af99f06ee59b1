"""Constraint compiles for a server: bounded, isolated from the server's process, and cached.

A grammar is compiled twice. First in a compile worker, a separate process (engine/generation/constraint_worker.py)
with an address-space limit (RLIMIT_AS), a smaller stack than the server's and a time limit (the worker is killed
past it): a grammar that crashes llguidance's native compiler, eats memory or takes too long fails there, and the
request gets a 400 naming why; the worker is restarted. Then, only when the worker came through, in the server's
process (llguidance cannot serialize a compiled matcher): compilation is deterministic, so the second compile takes
the path the first survived, on a larger stack. Compiled constraints are cached by grammar text, so a schema sent
again costs neither compile.

The compiles run on this compiler's own threads (one per worker), never on the event loop's or the default thread
pool: a few slow compiles cannot starve the server's other work. At most `max_waiting` compiles wait for a thread;
past that `submit` raises CompilerBusyError (HTTP 503 with Retry-After). `stop()` fails every waiting compile
(CompilerStoppedError) and kills the workers without waiting for a compile to end.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from engine.errors import EngineError
from engine.generation.constraint_worker import write_message
from engine.generation.constraints import (EMPTY_LANGUAGE, Constraint, ConstraintError, compile_constraint,
                                           one_line_error)

log = logging.getLogger("tinyllama.constraints")

WORKER_SCRIPT = Path(__file__).with_name("constraint_worker.py")
COMPILE_WORKERS = 2  # compile threads, each with its worker process
MAX_WAITING = 16  # compiles waiting for a thread; past that: CompilerBusyError
COMPILE_TIME_LIMIT = 10.0  # seconds a worker may take over one grammar (it is killed past it)
WORKER_MEMORY_MB = 2048  # a worker's address space (RLIMIT_AS; about 200 MiB of it is Python and the tokenizer)
WORKER_STACK_MB = 64  # a worker compiles on this stack; the server on COMPILE_STACK_MB (256): 4x more
WORKER_START_TIMEOUT = 120.0  # seconds a worker may take to start (Python, llguidance, the tokenizer: ~0.5-2 s)
CACHE_SIZE = 32  # compiled constraints kept, by (EOS ids, grammar text)


class CompilerBusyError(EngineError):
    """Too many constraint compiles are waiting: retry shortly (HTTP 503)."""


class CompilerStoppedError(EngineError):
    """The compiler was stopped (the server is shutting down) before this compile ran."""


class ConstraintCompiler:
    """Compiles constraints for one tokenizer (the model's `vocab_size`; `eos_ids` the usual EOS ids) on `workers`
    threads, each verifying in its own worker process first (`isolate`); `submit` -> a Future of the Constraint.
    Settings default to this module's constants."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: tuple[int, ...] = (), workers: int | None = None,
                 max_waiting: int | None = None, time_limit: float | None = None, memory_mb: int | None = None, isolate: bool = True,
                 cache_size: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = tuple(eos_ids)  # the usual ones (a worker builds its tokenizer for them first)
        self.workers = workers or COMPILE_WORKERS
        self.time_limit = time_limit or COMPILE_TIME_LIMIT
        self.memory_mb = memory_mb or WORKER_MEMORY_MB
        self.isolate = isolate
        self.cache_size = CACHE_SIZE if cache_size is None else cache_size
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, MAX_WAITING if max_waiting is None else max_waiting))
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stopped = False
        self._running: set[Future] = set()  # compiles under way (stop() fails them at once)
        self._processes: list[_WorkerProcess] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> "ConstraintCompiler":
        """Start the compile threads (each starts its worker process when it gets its first compile, ~0.5-1.5 s)."""
        setup = None
        if self.isolate:
            setup = {"tokenizer": self.tokenizer.to_json(), "n_vocab": self.vocab_size, "eos": list(self.eos_ids),
                     "stack_mb": WORKER_STACK_MB, "cpu_limit_s": math.ceil(self.time_limit) + 1,
                     "memory_mb": self.memory_mb}
        for i in range(self.workers):
            process = _WorkerProcess(setup, self.time_limit) if self.isolate else None
            thread = threading.Thread(target=self._serve, args=(process,), name=f"tinyllama-compile-{i}", daemon=True)
            self._processes.append(process)
            self._threads.append(thread)
            thread.start()
        return self

    @property
    def waiting(self) -> int:
        """Compiles waiting for a thread."""
        return self._queue.qsize()

    def cached(self, kind: str, grammar: str, eos_ids: tuple[int, ...]) -> Constraint | None:
        """The compiled constraint for this grammar when the cache holds it (it then counts as recently used)."""
        key = (tuple(eos_ids), grammar)
        with self._lock:
            constraint = self._cache.get(key)
            if constraint is not None:
                self._cache.move_to_end(key)
            return constraint

    def submit(self, kind: str, grammar: str, eos_ids: tuple[int, ...]) -> Future:
        """A Future of the compiled Constraint for (kind, grammar text from constraint_grammar, EOS ids); it fails
        with ConstraintError (a 400: the reason, or the limit the compile broke) or CompilerStoppedError. Cancel it
        to drop a compile that has not started. CompilerBusyError when MAX_WAITING compiles wait already."""
        future: Future = Future()
        constraint = self.cached(kind, grammar, eos_ids)
        if constraint is not None:
            future.set_result(constraint)
            return future
        if self._stopped:
            raise CompilerStoppedError("the server is shutting down")
        try:
            self._queue.put_nowait((future, kind, grammar, tuple(eos_ids)))
        except queue.Full:
            raise CompilerBusyError(f"{self._queue.maxsize} constraint compiles are waiting already; retry "
                                    f"shortly") from None
        return future

    def compile(self, kind: str, grammar: str, eos_ids: tuple[int, ...], timeout: float | None = None) -> Constraint:
        """submit(...) and wait for the result (a blocking convenience for tests and tools)."""
        return self.submit(kind, grammar, eos_ids).result(timeout)

    def stop(self) -> None:
        """Fail the waiting compiles (CompilerStoppedError), kill the workers; running compiles are not waited for
        (their threads are daemons)."""
        self._stopped = True
        with self._lock:
            running, self._running = self._running, set()
        for future in running:
            future.set_exception(CompilerStoppedError("the server is shutting down"))
        while True:
            try:
                future, *_ = self._queue.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(CompilerStoppedError("the server is shutting down"))
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)  # wake the threads up so they end
            except queue.Full:
                break
        for process in self._processes:
            if process is not None:
                process.close()

    def _serve(self, process: "_WorkerProcess | None") -> None:
        while not self._stopped:
            if process is not None and process.used and not process.closed:
                try:
                    process.ensure_started()  # again after a worker died: not on the next request's time
                except (RuntimeError, OSError) as error:
                    log.error("%s", error)
            item = self._queue.get()
            if item is None:
                return
            future, kind, grammar, eos_ids = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited (its client went away)
            with self._lock:
                self._running.add(future)
            try:
                constraint = self.cached(kind, grammar, eos_ids) or compile_constraint(
                    self.tokenizer, self.vocab_size, eos_ids, kind, grammar,
                    verify=None if process is None else process.verify)
            except BaseException as error:  # noqa: BLE001 - handed to the waiting request
                self._settle(future, error=error)
                continue
            with self._lock:
                self._cache[(eos_ids, grammar)] = constraint
                self._cache.move_to_end((eos_ids, grammar))
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            self._settle(future, result=constraint)

    def _settle(self, future: Future, result=None, error: BaseException | None = None) -> None:
        """Hand a running compile's outcome to its Future, unless stop() failed it already."""
        with self._lock:
            if future not in self._running:
                return
            self._running.discard(future)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class _WorkerProcess:
    """One compile worker process: started on first use, restarted after it dies or is killed."""

    def __init__(self, setup: dict, time_limit: float):
        self.setup = setup
        self.time_limit = time_limit
        self.process: subprocess.Popen | None = None
        self.closed = False
        self.used = False  # started on first use (a server that never compiles a constraint starts none)

    def ensure_started(self) -> None:
        """Start the worker and wait for its ready message (WORKER_START_TIMEOUT); RuntimeError when it fails."""
        if self.process is not None and self.process.poll() is None:
            return
        self.used = True
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, str(WORKER_SCRIPT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)
        try:
            write_message(self.process.stdin, self.setup)
            ready = self._read(WORKER_START_TIMEOUT)
        except (OSError, EOFError):
            ready = None
        if ready is None:
            status = self._kill()
            raise RuntimeError(f"the constraint compile worker did not start ({_describe(status)})")

    def verify(self, kind: str, grammar: str, eos_ids: tuple[int, ...]) -> None:
        """Compile `grammar` in the worker; ConstraintError naming `kind` when it fails there, or crashes the worker,
        or takes longer than the time limit (the worker is killed and restarted)."""
        if self.closed:
            raise CompilerStoppedError("the server is shutting down")
        self.ensure_started()
        started = time.monotonic()
        timed_out = False
        try:
            write_message(self.process.stdin, {"grammar": grammar, "eos": list(eos_ids)})
            reply = self._read(self.time_limit)
            timed_out = reply is None
        except (OSError, EOFError):  # it died (before it read the request, or while compiling)
            reply = None
        if reply is not None:
            error = reply["error"]
            if error == "out of memory":
                raise ConstraintError(f"{kind}: compiling it needs more than the {self.setup['memory_mb']} MiB a "
                                      f"compile may use (the limit)", kind)
            if error:
                raise ConstraintError(f"{kind}: {one_line_error(error)}", kind)
            if reply.get("empty"):
                raise ConstraintError(f"{kind}: {EMPTY_LANGUAGE}", kind)
            return
        status = self._kill()
        if self.closed:
            raise CompilerStoppedError("the server is shutting down")
        if timed_out:
            log.warning("a %s constraint took longer than %g s to compile: its worker was stopped", kind,
                        self.time_limit)
            raise ConstraintError(f"{kind}: compiling it took longer than {self.time_limit:g} s (the limit): make "
                                  f"the constraint smaller or simpler", kind)
        log.warning("a %s constraint crashed its compile worker (%s, after %.2f s); the worker restarts", kind,
                    _describe(status), time.monotonic() - started)
        raise ConstraintError(f"{kind}: the constraint compiler failed on it ({_describe(status)}; the server was "
                              f"not affected): make the constraint smaller or simpler", kind)

    def close(self) -> None:
        """Kill the worker (from any thread)."""
        self.closed = True
        self._kill()

    def _read(self, timeout: float) -> dict | None:
        """The worker's next message within `timeout` seconds; None when it did not answer in time, EOFError when
        it died."""
        import json

        deadline = time.monotonic() + timeout
        head = self._read_exact(4, deadline)
        if head is None:
            return None
        body = self._read_exact(struct.unpack(">I", head)[0], deadline)
        return None if body is None else json.loads(body.decode("utf-8"))

    def _read_exact(self, size: int, deadline: float) -> bytes | None:
        process = self.process
        if process is None:
            raise EOFError
        fd = process.stdout.fileno()
        data = b""
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                ready, _, _ = select.select([fd], [], [], remaining)
            except (OSError, ValueError):  # closed by close() on another thread
                raise EOFError from None
            if not ready:
                return None
            try:
                chunk = os.read(fd, size - len(data))
            except OSError:
                raise EOFError from None
            if not chunk:
                raise EOFError  # end of stream: the worker died
            data += chunk
        return data

    def _kill(self) -> int | None:
        """Kill the worker process and reap it -> its exit status (negative: the signal that ended it)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        status = process.wait()
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        return status


def _describe(status: int | None) -> str:
    """A worker's exit status in words ('killed by SIGSEGV', 'exit status 1')."""
    if status is None:
        return "no exit status"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
