"""Checkpoint I/O: safetensors only, atomic writes, and one-line errors that name the file.

Loading never reaches a model hub: paths must exist locally.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from causvid.errors import UserError


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or does not match the model. The message is one line."""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def load_diffusers_model(cls, path: str | Path, **kwargs):
    """`cls.from_pretrained(path)` for a local diffusers model directory, with clear errors."""
    path = Path(path)
    config = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not config.is_file():
        raise CheckpointError(f"{config}: missing model config")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config}: not valid JSON ({error})") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path}: no .safetensors weights found")
    for file in weights:
        check_safetensors(file)
    try:
        return cls.from_pretrained(path, use_safetensors=True, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: does not match {cls.__name__}: {_one_line(error)}") from None


def save_diffusers_model(model, path: str | Path) -> None:
    """`model.save_pretrained(path)` in safetensors, replacing the directory atomically."""
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


def check_safetensors(file: Path) -> None:
    """Raise `CheckpointError` unless `file` is a readable safetensors file."""
    try:
        with open(file, "rb") as handle:
            header = handle.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({file.stat().st_size} bytes)")
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as reader:
            reader.keys()
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file}: corrupt safetensors file ({_one_line(error)})") from None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _temporary_beside(path: Path) -> str:
    """A temporary file next to `path`, with the permissions a plain open() would give."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes files private (0600)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of directory `path` to write into; on success it replaces `path`.

    A reader never sees a half-written directory: a failed or killed write leaves the old one
    in place (a kill between the two renames leaves it under a hidden `.NAME.*.old` name). Files
    get the permissions a plain open() would give; some writers (diffusers) make them private.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        umask = _umask()
        for item in [tmp, *tmp.rglob("*")]:
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors `save_file`, made atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file with a clear error if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    check_safetensors(path)
    return load_file(str(path))


def read_json(path: str | Path) -> dict:
    """Read a JSON config with a clear error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
