"""Building the kernels: the C sources beside this file compiled once per (sources, compiler, flags) into a cache
folder, each source its own object so a variant the compiler cannot build is left out (named in `left_out`)."""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


HERE = Path(__file__).parent
SOURCES = ["api.c", "pool.c", "quantize.c", "kquant_pack.c", "kquant_quantize.c", "variant_avx512.c", "variant_avx2.c", "variant_portable.c"]
HEADERS = ["kernels.h", "pool.h", "matmul.h", "attention.h", "quant.h", "simd_avx512.h", "simd_avx2.h",
           "simd_portable.h", "kquant.h", "kquant_layout.h", "kquant_simd.h"]
# Never -ffast-math / -Ofast: GCC then links code that sets flush-to-zero for the whole process (subnormal weights
# and activations would become 0), and it may reorder the sums that make results reproducible.
CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-pthread"]
# On Windows (MinGW-w64) the DLL takes winpthreads and libgcc in statically: Python does not search PATH for a DLL's
# own dependencies, so a libwinpthread-1.dll beside the compiler would not be found when it loads.
LDFLAGS_WINDOWS = ["-static"]
LDFLAGS = ["-shared", "-pthread"] + (LDFLAGS_WINDOWS if sys.platform == "win32" else [])
LIBS = ["-lm"]
ABI_VERSION = 8
ISAS = ("avx512", "avx2", "portable")  # the enum order of kernels.h, most preferred first
VARIANT_SOURCES = {isa: f"variant_{isa}.c" for isa in ISAS}


def cache_dir() -> Path:
    """The folder compiled kernels are kept in."""
    if os.environ.get("TINYLLAMA_CACHE"):
        return Path(os.environ["TINYLLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinyllama-engine"


def compiler() -> list[str]:
    """The C compiler command: $CC, else `cc` (`gcc` on Windows, where MinGW-w64 has no `cc`)."""
    return shlex.split(os.environ.get("CC") or ("gcc" if sys.platform == "win32" else "cc"))


def library_path(folder: Path = HERE) -> Path:
    """Where build() puts (or finds) the library for the sources in `folder`, the compiler ($CC) and its flags."""
    compiler_ = compiler()
    digest = hashlib.sha256(repr((compiler_, CFLAGS, LDFLAGS, LIBS, platform.machine(), sys.platform)).encode())
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    suffix = ".dll" if sys.platform in ("win32", "cygwin") else ".so"
    return cache_dir() / f"tinyllama-kernels-{digest.hexdigest()[:16]}{suffix}"


def left_out(library: Path) -> dict[str, str]:
    """The variants build() left out of `library` because they did not compile -> {variant: compiler message}."""
    notes = library.with_suffix(".left-out")
    if not notes.exists():
        return {}
    lines = notes.read_text(encoding="utf-8").splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def _run(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(job: subprocess.Popen, compiler: list[str], what: str) -> str | None:
    """Wait for a compiler run -> None, or its failure with the end of its messages."""
    out, _ = job.communicate()
    if job.returncode == 0:
        return None
    message = out.strip()[-500:]
    return f"{' '.join(compiler)} failed on {what} (exit status {job.returncode}){': ' + message if message else ''}"


def compile_objects(compiler: list[str], folder: Path, work: str, flags: list[str] = ()) -> tuple[list[str], dict]:
    """Compile the library's sources in `folder` to objects in `work` (in parallel, `flags` added to CFLAGS) ->
    (object paths, {variant left out: compiler message}). A variant that does not compile is left out (api.c is told
    with -DTL_WITHOUT_<VARIANT>); RuntimeError when a shared source fails or no variant compiles, FileNotFoundError
    when there is no compiler."""
    def start(source: str, defines=()):
        obj = os.path.join(work, source.replace(".c", ".o"))
        return obj, _run(compiler + CFLAGS + list(flags) + list(defines) + ["-c", str(folder / source), "-o", obj])

    shared = [name for name in SOURCES if name != "api.c" and name not in VARIANT_SOURCES.values()]
    jobs = {name: start(name) for name in shared + list(VARIANT_SOURCES.values())}
    errors = {name: _finish(job, compiler, name) for name, (_, job) in jobs.items()}
    for name in shared:
        if errors[name]:
            raise RuntimeError(errors[name])
    skipped = {isa: errors[src] for isa, src in VARIANT_SOURCES.items() if errors[src]}
    if len(skipped) == len(ISAS):
        raise RuntimeError(skipped["portable"])
    api, job = start("api.c", [f"-DTL_WITHOUT_{isa.upper()}" for isa in skipped])
    if error := _finish(job, compiler, "api.c"):
        raise RuntimeError(error)
    left_out_sources = {VARIANT_SOURCES[isa] for isa in skipped}
    return [api] + [obj for name, (obj, _) in jobs.items() if name not in left_out_sources], skipped


def build(folder: Path = HERE) -> Path:
    """Compile the kernels in `folder` into the cache (once per source text, compiler and flags) -> the library path.

    Each source is its own object (compile_objects): a variant this compiler cannot build (an old compiler without a
    builtin or an instruction set) is left out, noted beside the library (left_out()), and the others stay.
    Raises RuntimeError with the compiler's message when nothing usable can be built."""
    cc = compiler()
    target = library_path(folder)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
        try:
            objects, skipped = compile_objects(cc, folder, work)
            tmp = os.path.join(work, "lib" + target.suffix)
            if error := _finish(_run(cc + LDFLAGS + ["-o", tmp] + objects + LIBS), cc, "linking"):
                raise RuntimeError(error)
        except FileNotFoundError as e:
            raise RuntimeError(f"no C compiler ({e.filename})") from None
        if skipped:  # before the library appears: whoever loads it finds the notes
            tmp_notes = os.path.join(work, "notes")
            Path(tmp_notes).write_text("".join(f"{isa}: {' '.join(msg.split())}\n" for isa, msg in skipped.items()),
                                       encoding="utf-8")
            os.replace(tmp_notes, target.with_suffix(".left-out"))
        os.replace(tmp, target)  # atomic: concurrent builders each write their own temp folder
    return target
