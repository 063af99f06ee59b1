"""A checkpoint folder in Hugging Face layout: config.json plus one or several (sharded) safetensors files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from weights.errors import CheckpointError
from weights.safetensors_file import SafetensorsFile, TensorInfo

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters save that carry no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_json(path: Path) -> dict:
    """Read a JSON object from `path`; CheckpointError naming the file when it is missing or invalid."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


class Checkpoint:
    """The tensors of a checkpoint folder across its shards, by name, read as float32."""

    def __init__(self, folder: Path, files: list[SafetensorsFile], where: dict[str, SafetensorsFile]):
        self.folder = folder
        self.files = files
        self._where = where

    @property
    def names(self) -> list[str]:
        """Names of all tensors across the shards."""
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        """TensorInfo (dtype, shape, byte range) of tensor `name`; KeyError if it is absent."""
        return self._where[name].tensors[name]

    def read_into(self, name: str, out: np.ndarray, first: int | None = None) -> None:
        """Copy tensor `name` into `out` (same element count): float32, or the tensor's own 16-bit storage; given
        `first`, the out.size elements from element `first` on instead (rows of a 2-D tensor: first = row * columns)."""
        self._where[name].read_into(name, out, first)

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a new float32 array."""
        return self._where[name].read(name)

    def validate(self, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset()) -> None:
        """Check that exactly the `expected` tensors are present (those in `optional` may be absent) with their shapes."""
        for name, shape in expected.items():
            if name not in self._where:
                if name in optional:
                    continue
                raise CheckpointError(f"{self.folder}: missing tensor '{name}' (expected shape {list(shape)})")
            info = self.info(name)
            if info.shape != tuple(shape):
                raise CheckpointError(
                    f"{self._where[name].path}: tensor '{name}' has shape {list(info.shape)}, "
                    f"but config.json implies {list(shape)}"
                )
        for name in self._where:
            if name not in expected and not name.endswith(IGNORED_SUFFIXES):
                raise CheckpointError(f"{self._where[name].path}: unexpected tensor '{name}' for this config")

    def close(self) -> None:
        """Close every shard's file."""
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(folder: str | os.PathLike) -> tuple[dict, Checkpoint]:
    """Open a Hugging Face checkpoint folder: (config.json as a dict, Checkpoint over its safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    config = read_json(folder / "config.json")
    index_path = folder / INDEX_FILE
    if index_path.exists():
        files, where = _open_sharded(folder, index_path)
    elif (folder / SINGLE_FILE).exists():
        f = SafetensorsFile(folder / SINGLE_FILE)
        files, where = [f], {name: f for name in f.tensors}
    else:
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(others) == 1:
            f = SafetensorsFile(folder / others[0])
            files, where = [f], {name: f for name in f.tensors}
        else:
            found = ", ".join(p.name for p in folder.iterdir()) or "nothing"
            raise CheckpointError(
                f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found}); "
                "only safetensors checkpoints are supported"
            )
    return config, Checkpoint(folder, files, where)


def _open_sharded(folder: Path, index_path: Path):
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' object")
    shards: dict[str, SafetensorsFile] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.exists():
            raise CheckpointError(f"{path}: missing file (listed in {INDEX_FILE})")
        shards[shard] = SafetensorsFile(path)
    where = {}
    for name, shard in weight_map.items():
        f = shards[shard]
        if name not in f.tensors:
            raise CheckpointError(f"{f.path}: tensor '{name}' listed in {INDEX_FILE} is not in this file")
        where[name] = f
    for f in shards.values():
        for name in f.tensors:
            if name not in where:
                raise CheckpointError(f"{f.path}: tensor '{name}' is not listed in {INDEX_FILE}")
    return list(shards.values()), where
