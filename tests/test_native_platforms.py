"""The compiled kernels on the machines users have (docs/kernels.md, "Platforms"): warning-free builds with GCC and
with the oldest Clang here, the ARM build run under qemu-user, compile-only builds for macOS against stand-in SDK
headers, and every way the kernels can be missing (no compiler, a compile error, a variant that does not compile, no
os.uname, a library that does not load, a CPU without the features, a platform without a compiler) ending in NumPy
with one line on stderr when a model loads. The toolchains are Debian packages `.ci/run` installs (clang,
gcc-aarch64-linux-gnu, qemu-user); a test whose toolchain is missing skips with the reason."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from engine.runtime import native
from engine.runtime.native.selftest import build_selftest
from tests.conftest import REPO, shared_model
from tests.test_native import cpu_has_vnni, selftest_lines

STANDIN_MACOS = REPO / "tests" / "standin_headers" / "macos"
QEMU_ARM = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]


def oldest_clang() -> str | None:
    """The oldest clang on PATH (clang-14 on Debian 12), None without one."""
    found = []
    for name in ["clang"] + [f"clang-{v}" for v in range(11, 30)]:
        path = shutil.which(name)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            version = out.split("version", 1)[-1].split()[0] if "version" in out else "0"
            found.append((tuple(int(p) for p in version.split(".")[:2] if p.isdigit()), name))
    return min(found)[1] if found else None


CLANG = oldest_clang()
needs_clang = pytest.mark.skipif(CLANG is None, reason="no clang (Debian: apt-get install clang)")
needs_arm = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
    reason="no aarch64 cross compiler and qemu-user (Debian: gcc-aarch64-linux-gnu qemu-user)")


def run_selftest(binary, prefix=()) -> list[str]:
    done = subprocess.run(list(prefix) + [str(binary)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


@needs_clang
def test_oldest_clang_builds_every_variant_without_warnings_and_passes(tmp_path):
    """Clang before 18 rejected the library (__builtin_cpu_supports("f16c")): the oldest clang here builds every
    variant with -Wall -Wextra -Werror and the selftest passes on each variant this CPU runs. (GCC:
    tests/test_native.py::test_c_selftest_on_this_machine.)"""
    build_selftest([CLANG], tmp_path / "selftest", strict=True)
    assert run_selftest(tmp_path / "selftest") == selftest_lines(native.usable_isas(), cpu_has_vnni())


@needs_arm
def test_portable_variant_on_arm_under_qemu(tmp_path):
    """The portable variant cross-compiled for aarch64 with GCC (NEON through the vector extensions), warning-free,
    and run under qemu-user: the kernels a Graviton or Apple M-series machine builds, every exported kernel checked
    against double precision."""
    build_selftest(["aarch64-linux-gnu-gcc"], tmp_path / "selftest-arm", strict=True)
    assert run_selftest(tmp_path / "selftest-arm", QEMU_ARM) == selftest_lines(["portable"], vnni=False)


@needs_clang
def test_macos_arm64_compiles_against_stand_in_sdk_headers():
    """clang --target=arm64-apple-macos11 compiles every source warning-free against the stand-in SDK headers
    (tests/standin_headers/macos): Apple Silicon's build, compiled but neither linked nor run here."""
    build_selftest([CLANG], None, target="arm64-apple-macos11", strict=True,
                   flags=["-nostdlibinc", "-isystem", str(STANDIN_MACOS)])


@pytest.mark.slow
@needs_clang
def test_macos_x86_64_compiles_against_stand_in_sdk_headers():
    """The same for an Intel Mac (x86_64-apple-macos10.15: all three variants and the cpuid feature checks)."""
    build_selftest([CLANG], None, target="x86_64-apple-macos10.15", strict=True,
                   flags=["-nostdlibinc", "-isystem", str(STANDIN_MACOS)])


@pytest.mark.slow
@needs_arm
@needs_clang
def test_clang_aarch64_build_under_qemu(tmp_path):
    """The aarch64 build with clang (the compiler of Apple Silicon) instead of GCC, run under qemu-user."""
    build_selftest([CLANG], tmp_path / "selftest-arm", target="aarch64-linux-gnu", strict=True)
    assert run_selftest(tmp_path / "selftest-arm", QEMU_ARM) == selftest_lines(["portable"], vnni=False)


MINGW = shutil.which("x86_64-w64-mingw32-gcc-posix") or shutil.which("x86_64-w64-mingw32-gcc")


@pytest.mark.slow
@pytest.mark.skipif(MINGW is None, reason="no MinGW-w64 cross compiler (Debian: gcc-mingw-w64-x86-64-posix)")
def test_windows_dll_cross_built_with_mingw(tmp_path):
    """The Windows build with MinGW-w64 GCC: every variant compiles warning-free, the DLL links with the loader's
    Windows flags and imports only Windows' own DLLs (a libwinpthread-1.dll beside the compiler would not be found
    when Python loads it), and selftest.exe links. Built, not run (no Windows here)."""
    from engine.runtime.native.selftest import STRICT_FLAGS

    objects, skipped = native.compile_objects([MINGW], native.HERE, str(tmp_path), STRICT_FLAGS)
    assert not skipped
    dll = tmp_path / "tinyllama-kernels.dll"
    done = subprocess.run([MINGW, "-shared", "-pthread"] + native.LDFLAGS_WINDOWS + ["-o", str(dll)] + objects
                          + native.LIBS, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    objdump = shutil.which("x86_64-w64-mingw32-objdump")
    if objdump:
        table = subprocess.run([objdump, "-p", str(dll)], capture_output=True, text=True).stdout
        imports = {line.split(":", 1)[1].strip().lower() for line in table.splitlines() if "DLL Name:" in line}
        assert imports <= {"kernel32.dll", "msvcrt.dll"}, imports
    main = tmp_path / "selftest.o"
    for command in ([MINGW] + native.CFLAGS + STRICT_FLAGS + ["-c", str(native.HERE / "selftest.c"), "-o", str(main)],
                    [MINGW, "-pthread", "-o", str(tmp_path / "selftest.exe"), str(main)] + objects + native.LIBS):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_a_variant_that_does_not_compile_is_left_out_and_the_others_stay(tmp_path):
    """A compiler that fails on some variants (one without AVX-512 or AVX2 support, or GCC < 9 on a builtin): the
    library is built without them, status() names each with the compiler's message, and the one left runs."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "cc"
    wrapper.write_text("#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in *variant_avx512.c|*variant_avx2.c) "
                       "echo 'error: simulated missing builtin' >&2; exit 1;; esac; done\n"
                       f"exec {os.environ.get('CC', 'cc')} \"$@\" -O0\n")  # -O0: a quicker build, same outcome
    wrapper.chmod(0o755)
    code = "from engine.runtime import native; import json; print(json.dumps([native.summary(), native.usable_isas()]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(os.environ, CC=str(wrapper), TINYLLAMA_CACHE=str(tmp_path / "cache")))
    summary, usable = json.loads(done.stdout)
    assert summary["available"] and summary["variant"] == "portable" and usable == ["portable"]
    for isa in ("avx512", "avx2"):
        assert f"{isa} left out: {wrapper} failed on variant_{isa}.c (exit status 1): error: simulated missing " \
               "builtin" in summary["detail"]


# ---- every way the kernels can be missing: NumPy, one line on stderr, never a traceback ----

LOAD = """
import json, os, sys
{setup}
import engine
from engine.runtime import native
m = engine.load_model({model!r})
engine.load_model({model!r})  # a second load says nothing more
logits = m.logits([1, 20, 30, 40])
print(json.dumps({{"summary": native.summary(), "dtype": m.weights_dtype, "argmax": int(logits[-1].argmax())}}))
"""
SETUPS = {
    "compile error": ("", {"CC": "false"}, "not built: false failed on pool.c"),
    "no compiler": ("", {"CC": "/nonexistent/cc"}, "not built: no C compiler (/nonexistent/cc)"),
    "load error": ("from engine.runtime import native as n; p = n.library_path(); p.parent.mkdir(parents=True); "
                   "p.write_bytes(b'not a shared library')", {}, "not loaded: "),
    "cpu without the features": ("from engine.runtime.native import library; library._Library.usable = lambda self: []",
                                 {"TINYLLAMA_CACHE": os.environ.get("TINYLLAMA_CACHE")},  # this process's library
                                 "this CPU runs none of the compiled variants"),
    "platform without a compiler": ("import engine.runtime.native; sys.platform = 'emscripten'", {},
                                    "no C compiler can run on this platform (emscripten)"),
}


@pytest.mark.parametrize("case", list(SETUPS))
def test_every_missing_kernels_case_ends_in_numpy_with_one_line(tmp_path, case):
    """Each way ends in the NumPy path (float32 weights, the same greedy token as with the kernels) with exactly one
    stderr line saying why and what it costs, on the first model load only, and `native.summary()` (what
    `tinyllama check --json` and bench record) carries the reason. A bf16 checkpoint (widened: the cost line says so)
    for the compile error, stories260K (float32 already) for the others."""
    if case == "compile error":
        from tests.conftest import make_random_checkpoint

        model, cost = make_random_checkpoint(tmp_path / "bf16", dtype="bfloat16"), native.FALLBACK_COST
    else:
        model, cost = shared_model("stories260K"), native.FALLBACK_COST_FP32
    setup, env, reason = SETUPS[case]
    env = {k: v for k, v in {**os.environ, "TINYLLAMA_CACHE": str(tmp_path / "cache"), **env}.items() if v is not None}
    done = subprocess.run([sys.executable, "-c", LOAD.format(setup=setup, model=str(model))], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyllama: compiled kernels unavailable (") and reason in lines[0]
    assert lines[0].endswith(f"): {cost}")
    out = json.loads(done.stdout)
    assert out["summary"]["available"] is False and out["summary"]["variant"] is None
    assert reason in out["summary"]["reason"] and out["dtype"] == "float32"
    import engine

    expected = engine.load_model(str(model)).logits([1, 20, 30, 40])[-1]
    assert out["argmax"] == int(np.argmax(expected))


def test_no_os_uname_still_finds_and_loads_the_kernels(tmp_path):
    """Windows has no os.uname (build() called it, and the AttributeError escaped the loader): without it the
    library's cache path is computed, the library found there and loaded, and a model loads silently. (The cache is
    seeded with this process's library at that path, so the test does not compile it again.)"""
    if not native.status().available:
        pytest.skip(f"the compiled kernels are not usable here: {native.status().detail}")
    model = shared_model("stories260K")
    built = native.status().detail.split(", ")[2].split(";")[0]
    setup = ("import numpy\ndel os.uname  # (NumPy itself calls it on Linux, not on Windows)\nimport shutil\n"
             "from engine.runtime import native as n\np = n.library_path()\n"
             f"p.parent.mkdir(parents=True)\nshutil.copy({built!r}, p)")
    done = subprocess.run([sys.executable, "-c", LOAD.format(setup=setup, model=str(model))], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=dict(os.environ, TINYLLAMA_CACHE=str(tmp_path / "c")))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["summary"]["available"] and out["summary"]["variant"] == native.status().isa and not done.stderr
    assert str(tmp_path / "c") in out["summary"]["detail"]
