"""A constraint-compile worker: a separate process that compiles grammars with llguidance, so that a grammar which
crashes the native compiler (a stack overflow, an abort) or eats memory takes down this process, never the server.

Run as a script (`python constraint_worker.py`; the engine imports it only for its helpers: it needs only the
standard library and llguidance, so it starts in a fraction of a second). It speaks length-prefixed JSON on stdin /
stdout (4-byte big-endian length, then UTF-8 JSON):

    -> {"tokenizer": tokenizer.json text, "n_vocab": int, "eos": [usual ids], "stack_mb": int, "memory_mb": int,
        "cpu_limit_s": int}
    <- {"ready": true}
    -> {"grammar": llguidance grammar text, "eos": [ids]}        (any number of times)
    <- {"error": "", "empty": bool}  compiled, the first mask computed (empty: the grammar admits no text)
       or {"error": llguidance's message, "empty": false}

Before the tokenizer is built the worker caps its address space at `memory_mb` (RLIMIT_AS) and turns core dumps
off; each grammar is compiled on a thread with a `stack_mb` stack (smaller than the server's compile threads, so a
grammar that fits here fits there) and its first mask is computed on an llguidance executor thread, as the server
computes masks. The parent enforces the time limit (it kills a worker that does not answer in time); a CPU-time
limit a little past it (RLIMIT_CPU, set before each grammar) ends a worker whose parent died meanwhile.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import sys
import threading


def read_message(stream) -> dict | None:
    """One length-prefixed JSON message from a binary stream; None at end of stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    return json.loads(stream.read(size).decode("utf-8"))


def write_message(stream, message: dict) -> None:
    """One length-prefixed JSON message to a binary stream, flushed."""
    data = json.dumps(message).encode("utf-8")
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def compile_and_mask(llguidance, tokenizer, executor, grammar: str, n_vocab: int, eos: tuple) -> dict:
    """Compile `grammar`, then compute its first mask on `executor` -> the reply: {"error": llguidance's message or
    '', "empty": whether the grammar admits no text (not even the empty one, and its first mask allows no token but
    EOS)}."""
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        return {"error": matcher.get_error(), "empty": False}
    if matcher.is_accepting():
        return {"error": "", "empty": False}
    words = (n_vocab + 31) // 32
    mask = (ctypes.c_int32 * words)()  # what llguidance.numpy does, without importing NumPy here
    executor.unsafe_compute_mask_ptr([(matcher, 0)], ctypes.addressof(mask), words * 4, 1)
    for token in eos:
        if token < n_vocab:
            mask[token // 32] &= ~(1 << (token % 32))
    return {"error": "", "empty": matcher.is_error() or not any(mask)}


_STACK_SIZE_LOCK = threading.Lock()


def on_thread(function, stack_mb: int):
    """function() run on a new thread with a stack of stack_mb MiB (address space, touched only as used) -> its
    result (its exception re-raised). The server's compiles use it too (constraints.on_big_stack)."""
    out: dict = {}

    def run():
        try:
            out["value"] = function()
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = error

    with _STACK_SIZE_LOCK:  # threading.stack_size is process-wide: set it only around this thread's start
        previous = threading.stack_size(stack_mb * 2 ** 20)
        try:
            thread = threading.Thread(target=run, name="tinyllama-constraint-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def main() -> int:
    """Serve compile requests on stdin / stdout until stdin closes -> exit status 0."""
    import resource  # POSIX only: here, not at the top, so the engine can import the helpers above anywhere
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but messages on the protocol stream
    setup = read_message(stdin)
    if setup is None:
        return 0
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    memory = setup["memory_mb"] * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    import llguidance

    tokenizers = {}  # EOS ids -> LLTokenizer (the server's are built the same way: constraints.ll_tokenizer)

    def tokenizer(eos: tuple) -> object:
        if eos not in tokenizers:
            tokenizers[eos] = llguidance.LLTokenizer(setup["tokenizer"], n_vocab=setup["n_vocab"],
                                                     eos_token=list(eos) or None)
        return tokenizers[eos]

    tokenizer(tuple(setup["eos"]))  # the usual EOS ids: built before the first request
    executor = llguidance.LLExecutor(num_threads=1)
    write_message(stdout, {"ready": True})
    while True:
        request = read_message(stdin)
        if request is None:
            return 0
        eos = tuple(request["eos"])
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = math.ceil(used.ru_utime + used.ru_stime) + setup["cpu_limit_s"]
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        if hard != resource.RLIM_INFINITY:
            cpu = min(cpu, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, hard))  # SIGXCPU past it, orphaned or not
        try:
            ll_tokenizer = tokenizer(eos)
            reply = on_thread(lambda: compile_and_mask(llguidance, ll_tokenizer, executor, request["grammar"],
                                                       setup["n_vocab"], eos), setup["stack_mb"])
        except MemoryError:
            reply = {"error": "out of memory", "empty": False}
        write_message(stdout, reply)


if __name__ == "__main__":
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    sys.exit(main())
