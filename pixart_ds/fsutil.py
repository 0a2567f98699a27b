"""Atomic writes: the one way pixart_ds writes a file or folder that someone else may read.

A reader (a resuming run, another rank, a user's `ls`) sees the old content or the new one, never a mix: the bytes
go to a temporary name in the same directory, are flushed to disk (fsync), and are renamed over the target
(rename is atomic within a filesystem); the directory entry is then fsynced so the rename survives a crash. A write
that fails (ENOSPC, an exception in the writer, a signal) removes its temporary and leaves the target as it was.

    atomic_write(path, lambda tmp: image.save(tmp))      # any writer that takes a path (the suffix is kept)
    atomic_write_text(path, text) / atomic_write_bytes(path, data) / atomic_write_json(path, obj)
    write_dir_atomic(path, lambda tmp_dir: ...)          # a whole folder, renamed into place when complete
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from typing import Any, Callable

_counter = itertools.count()


def fsync_dir(path: str) -> None:
    """Make renames and new entries in `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temp_name(path: str) -> str:
    """A hidden sibling of `path`, unique per process and call, that keeps its suffix (PIL and safetensors choose
    the format from it)."""
    d, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    return os.path.join(d, f".{stem}.{os.getpid()}.{next(_counter)}.tmp{ext}")


def atomic_write(path: str, write: Callable[[str], Any], durable: bool = True) -> None:
    """write(tmp_path) then rename onto `path` (parent directories are created)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(d)


def atomic_write_text(path: str, text: str, durable: bool = True) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, durable)


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, durable)


def atomic_write_json(path: str, obj: Any, indent: int = 2, durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n", durable)


def write_dir_atomic(path: str, write: Callable[[str], Any], replace: bool = False) -> None:
    """write(tmp_dir) then rename the folder to `path`. An existing non-empty `path` is refused unless `replace`
    (then the old folder is removed only after the new one is complete)."""
    exists = os.path.exists(path)
    if exists and not replace and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path}: output exists and is not empty; remove it or choose another path")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the folder private to its writer
    try:
        write(tmp)
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=".old.", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
