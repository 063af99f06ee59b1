"""llama.cpp for the benchmark: is llama-cpp-python installed, and a GGUF of a Hugging Face checkpoint.

The checkpoint is converted with llama.cpp's own `convert_hf_to_gguf.py` (--outtype f32|f16|bf16|q8_0), as
../shared/BASELINES.md measured it; q4_0 and q4_K_M are made from the f16 GGUF by llama.cpp's own quantizer
(`llama_cpp.llama_model_quantize`, as `llama-quantize` does; no importance matrix). The converter is found at $TINYLLAMA_GGUF_CONVERTER, else in the cache (made from
the llama-cpp-python source distribution of the installed version: `pip download --no-binary :all: --no-deps`).
GGUF files are cached under the benchmark cache, keyed by the checkpoint's path, size and time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.checkpoints import cache_root

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str | None:
    try:
        from importlib.metadata import version as v

        return v("llama-cpp-python")
    except Exception:
        return None


def shared_tokenizer_dir() -> Path | None:
    """TinyLlama's real tokenizer in ../shared/models (the converter needs a vocabulary; random weights have none)."""
    here = Path(__file__).resolve().parent.parent
    root = Path(os.environ.get("TINYLLAMA_SHARED_MODELS", here.parent / "shared" / "models"))
    path = root / "tinyllama-1.1b-chat-v1.0"
    return path if (path / "tokenizer.json").exists() else None


def _extracted(src: Path) -> Path | None:
    found = sorted(src.glob("*/vendor/llama.cpp/.extracted"))
    return found[-1].parent / "convert_hf_to_gguf.py" if found else None


def _wanted(name: str) -> bool:
    """The converter's files in the sdist: llama.cpp's top-level scripts, its conversion/ package, gguf-py."""
    head, sep, rest = name.partition("/vendor/llama.cpp/")
    return bool(sep) and "/" not in head and (
        ("/" not in rest and rest.endswith(".py")) or rest.startswith(("conversion/", "gguf-py/")))


def converter() -> Path:
    """Path of convert_hf_to_gguf.py (fetched once from the llama-cpp-python sdist of the installed version)."""
    env = os.environ.get("TINYLLAMA_GGUF_CONVERTER")
    if env:
        return Path(env)
    src = cache_root() / "llama-cpp-src"
    script = _extracted(src)
    if script:
        return script
    src.mkdir(parents=True, exist_ok=True)
    ver = version()
    archives = sorted(src.glob(f"llama_cpp_python-{ver or '*'}.tar.gz"))
    if not archives:
        spec = f"llama-cpp-python=={ver}" if ver else "llama-cpp-python"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "-d",
                        str(src), spec], check=True, stdout=subprocess.DEVNULL)
        archives = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    for archive in archives[-1:]:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if _wanted(m.name)]
            tar.extractall(src, members=members, filter="data")
            root = members[0].name.split("/vendor/llama.cpp/")[0] if members else None
        if root:
            (src / root / "vendor" / "llama.cpp" / ".extracted").touch()
    script = _extracted(src)
    if not script or not script.exists():
        raise RuntimeError(f"convert_hf_to_gguf.py not found in the llama-cpp-python sdist under {src}")
    return script


def _key(folder: Path) -> str:
    stats = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in sorted(folder.glob("*.safetensors"))]
    return hashlib.sha1(repr((str(folder.resolve()), stats)).encode()).hexdigest()[:12]


# GGUF types made by llama.cpp's quantizer from the f16 file, with their llama_ftype constant's name
QUANTIZER_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                   "q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                   "q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
                   "q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
                   "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1"}
# "-pure": every tensor in the named type (llama_model_quantize's `pure`), where llama.cpp's mixes would keep the
# output matrix (and, for the k-quants, some attn_v / ffn_down) in Q6_K: q4_0-pure is a file of Q4_0 alone.
PURE_SUFFIX = "-pure"


def quantize_gguf(source: Path, out: Path, outtype: str, threads: int = 2) -> None:
    """llama.cpp's quantizer (llama_model_quantize) from the GGUF `source` to `out` at `outtype` (q4_0, q4_K_M, ...,
    or q4_0-pure: every tensor in that type)."""
    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    pure = outtype.endswith(PURE_SUFFIX)
    params.ftype = getattr(L, QUANTIZER_TYPES[outtype.removesuffix(PURE_SUFFIX)])
    params.pure = pure
    params.nthread = threads
    tmp = out.with_suffix(".part")
    try:
        rc = L.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {outtype} returned {rc}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def gguf_for(folder, outtype: str) -> Path:
    """A cached GGUF of the checkpoint in `folder` at `outtype` (f32, f16, bf16, q8_0 by the converter; q4_0,
    q4_K_M, q6_K, ... (QUANTIZER_TYPES, optionally -pure) by the quantizer from the f16 file)."""
    folder = Path(folder)
    out = cache_root() / "gguf" / f"{folder.name}-{_key(folder)}-{outtype}.gguf"
    if out.exists():
        return out
    if outtype.removesuffix(PURE_SUFFIX) in QUANTIZER_TYPES:
        quantize_gguf(gguf_for(folder, "f16"), out, outtype)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_suffix(".src")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    tok = None if (folder / "tokenizer.json").exists() else shared_tokenizer_dir()
    for p in folder.iterdir():
        if p.is_file():
            (stage / p.name).symlink_to(p.resolve())
    if tok is not None:
        for name in TOKENIZER_FILES:
            if (tok / name).exists() and not (stage / name).exists():
                (stage / name).symlink_to((tok / name).resolve())
    script = converter()
    env = dict(os.environ)
    gguf_py = script.parent / "gguf-py"
    if gguf_py.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(gguf_py)] + [p for p in [env.get("PYTHONPATH")] if p])
    tmp = out.with_suffix(".part")
    try:
        r = subprocess.run([sys.executable, str(script), str(stage), "--outtype", outtype, "--outfile", str(tmp)],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed: {tail[0]}")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        tmp.unlink(missing_ok=True)
    return out


def gguf_tensor_bytes(path) -> dict[str, int]:
    """name -> bytes of every tensor in the GGUF file at `path`, read with gguf-py (llama.cpp's own reader, from the
    converter's source tree; the `gguf` package where that has none)."""
    gguf_py = converter().parent / "gguf-py"
    if gguf_py.is_dir() and str(gguf_py) not in sys.path:
        sys.path.insert(0, str(gguf_py))
    import gguf

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}


def amx_build() -> bool:
    """Whether this CPU has AMX-INT8 and the installed llama.cpp was built with it: then its extra CPU buffer types
    (the AMX and repacked weight layouts) crash on quantized types (q8_0, q4_0, q4_K_M die with a segfault on the
    first decode here), so the benchmark loads models without them (`use_extra_bufts = False`)."""
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if "amx_int8" not in cpu:
        return False
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.llamacpp TYPE [--model FOLDER]`: make (once) and print the path of llama.cpp's GGUF of the
    checkpoint at TYPE (default: the random bf16 checkpoint of TinyLlama's shape), for bench.interleave --model."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=main.__doc__.split("\n")[0])
    p.add_argument("type", help="f32, f16, bf16, q8_0 (converter) or " + ", ".join(QUANTIZER_TYPES)
                   + " (quantizer; append -pure for every tensor in that type)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: TinyLlama's shape, random bf16)")
    args = p.parse_args(argv)
    if args.model is None:
        from bench.checkpoints import TINYLLAMA_SHAPE, random_checkpoint

        folder = random_checkpoint(TINYLLAMA_SHAPE, "bfloat16")
    else:
        folder = Path(args.model)
    print(gguf_for(folder, args.type))
    return 0


if __name__ == "__main__":
    sys.exit(main())
