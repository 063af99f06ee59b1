"""Model references: a local folder, or a Hugging Face Hub repo id fetched into the standard HF cache."""
from __future__ import annotations

import os
from pathlib import Path

from weights.errors import CheckpointError

DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
# Only what inference needs: no PyTorch .bin, no ONNX or GGUF copies.
NEEDED_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
]


def looks_like_path(ref: str) -> bool:
    """True for references a user means as a folder (./x, /x, ~/x, x/y/z), false for Hub ids like 'org/name'."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep != "/" and os.sep in ref


def resolve_model_folder(ref: str = DEFAULT_MODEL, revision: str | None = None) -> Path:
    """Turn a model reference into a local folder, downloading Hub repos (with a progress bar) when needed.

    An existing folder is used as it is. Otherwise `ref` is a Hub repo id; `huggingface_hub.snapshot_download` fetches
    only the files inference needs into the standard cache (so a model already downloaded by transformers is reused),
    and honours HF_HUB_OFFLINE=1 by using the cache alone.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if looks_like_path(ref) or path.exists():
        raise CheckpointError(f"{ref}: no such model folder")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a declared dependency
        raise CheckpointError(f"{ref}: not a folder, and huggingface_hub is not installed to download it") from None
    try:
        folder = snapshot_download(ref, revision=revision, allow_patterns=NEEDED_FILES)
    except RevisionNotFoundError:
        raise CheckpointError(f"{ref}: revision {revision!r} not found on the Hugging Face Hub") from None
    except GatedRepoError:
        raise CheckpointError(f"{ref}: gated repository; accept its licence on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{ref}: no such folder, and no such repository on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(offline_message(ref)) from None
    except (OSError, ValueError) as e:  # connection errors, HTTP errors, bad repo ids
        raise CheckpointError(f"{ref}: could not download from the Hugging Face Hub ({first_line(e)})") from None
    return Path(folder)


def offline_message(ref: str) -> str:
    """The one line a user sees when the model is neither reachable nor cached."""
    return (
        f"{ref}: not in the Hugging Face cache and the Hub cannot be reached"
        f"{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE', '') not in ('', '0') else ''}; "
        f"download it once on a connected machine (`hf download {ref}`) into the cache "
        f"(HF_HOME / HF_HUB_CACHE), or pass --model /path/to/folder"
    )


def first_line(e: BaseException) -> str:
    """The first line of the exception's message, or its class name when the message is empty."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def resolve_gguf_file(ref: str, gguf_file: str | None = None, revision: str | None = None) -> Path:
    """A GGUF model reference -> the local file: `ref` a .gguf path (used as it is), or `ref` a local folder / Hub repo
    id and `gguf_file` the file's name in it. A Hub file is fetched with `huggingface_hub.hf_hub_download` into the
    standard cache (HF_HUB_OFFLINE=1: the cache alone). CheckpointError (one line) for a missing file, a file name
    the repo does not have (naming the .gguf files it has, when the Hub can list them), or an unreachable Hub."""
    if gguf_file is None:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{ref}: no such GGUF file")
        return path
    folder = Path(ref).expanduser()
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            found = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))) or "none"
            raise CheckpointError(f"{folder}: no file {gguf_file!r} (GGUF files there: {found})")
        return path
    if looks_like_path(ref):
        raise CheckpointError(f"{ref}: no such model folder")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(ref, gguf_file, revision=revision))
    except RevisionNotFoundError:
        raise CheckpointError(f"{ref}: revision {revision!r} not found on the Hugging Face Hub") from None
    except GatedRepoError:
        raise CheckpointError(f"{ref}: gated repository; accept its licence on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{ref}: no such repository on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(offline_message(ref).replace(f"`hf download {ref}`", f"`hf download {ref} {gguf_file}`")
                              .replace("--model /path/to/folder", "--model /path/to/file.gguf")) from None
    except EntryNotFoundError:
        raise CheckpointError(f"{ref}: no file {gguf_file!r} in the repository "
                              f"(GGUF files there: {_repo_gguf_files(ref, revision)})") from None
    except (OSError, ValueError) as e:  # connection errors, HTTP errors, bad repo ids
        raise CheckpointError(f"{ref}: could not download {gguf_file} from the Hugging Face Hub ({first_line(e)})") from None


def _repo_gguf_files(ref: str, revision: str | None) -> str:
    """The .gguf file names of a Hub repo, comma-separated ("unknown" when the Hub cannot list them)."""
    try:
        from huggingface_hub import HfApi

        names = sorted(n for n in HfApi().list_repo_files(ref, revision=revision) if n.endswith(".gguf"))
    except Exception:  # listing is a courtesy: any failure leaves the message without it
        return "unknown"
    return ", ".join(names) or "none"


def folder_gguf(ref: str) -> Path | None:
    """The GGUF file a local folder stands for when it holds .gguf files and no safetensors (a folder downloaded from
    a GGUF repo): its one .gguf file; CheckpointError naming them when there are several; None for anything else."""
    folder = Path(ref).expanduser()
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{folder}: several GGUF files ({', '.join(p.name for p in found)}); pick one with "
                              "--gguf-file NAME")
    return found[0] if found else None
