"""Training checkpoints: written atomically, verified before they are trusted.

Layout of a run's checkpoints (`<out>/checkpoints/`):

    step_00001000/
        model/          save_pretrained (mamba_ssm format): config.json, model.safetensors
        trainer.pt      optimizer, scheduler, RNG states, step, the run's configuration (torch.save)
        manifest.json   size and sha256 of every file above; written last
    step_00002000/ ...

A checkpoint is first written to a hidden temporary directory beside the others, flushed to disk,
then renamed into place: a step directory either exists complete or not at all, so the newest one
is the one to resume from. Loading checks every file against the manifest and refuses a checkpoint
that fails (truncated, edited, half-deleted) with an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

FORMAT = "mamba-compiled-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_DIR = "model"
TRAINER_FILE = "trainer.pt"
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit():
            found.append((int(p.name[len(_PREFIX) :]), p))
    return sorted(found)


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    """Delete a directory so that no half-deleted step directory is ever visible."""
    trash = path.with_name(f"{_TMP_PREFIX}deleting-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def save(
    root: Path,
    step: int,
    save_model: Callable[[Path], None],
    trainer_state: dict,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically; keep only the newest `keep_last`.

    `save_model(directory)` writes the model there (save_pretrained); `trainer_state` is saved with
    torch.save and must hold only tensors, numbers, strings and containers of them (it is loaded
    back with weights_only=True).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # left behind by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    final = step_dir(root, step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    tmp.mkdir()
    save_model(tmp / MODEL_DIR)
    torch.save(trainer_state, tmp / TRAINER_FILE)
    files = {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (a resumed run that stopped where it began)
        _remove(final)
    os.replace(tmp, final)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep_last is not None:
        for _, old in list_checkpoints(root)[:-keep_last]:
            _remove(old)
    return final


def resolve(path: Path) -> Path:
    """A step directory from a run directory, a checkpoints directory or a step directory."""
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.startswith(_PREFIX):
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1][1]
    raise CheckpointError(f"no checkpoint under {path} (looked for {path}/checkpoints/{_PREFIX}*)")


def verify(path: Path) -> dict:
    """The manifest of checkpoint `path` once every file matches it; CheckpointError otherwise."""
    path = Path(path)
    others = ""
    siblings = [p for _, p in list_checkpoints(path.parent) if p != path]
    if siblings:
        others = f"; to continue from an earlier one pass --resume {siblings[-1]}"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist{others}")
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: no {MANIFEST} (it was not written by this trainer, "
            f"or was damaged after it was written){others}"
        )
    try:
        manifest = json.loads(file.read_text())
        if manifest["format"] != FORMAT:
            raise ValueError(f"format is {manifest['format']!r}, expected {FORMAT!r}")
        if manifest["version"] != VERSION:
            raise ValueError(f"version {manifest['version']} (this trainer reads {VERSION})")
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {file} is unreadable ({e}){others}"
        ) from e
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} is missing{others}")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {rel} has {size} bytes, the manifest says "
                f"{meta['bytes']} (truncated or overwritten){others}"
            )
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {rel} fails its sha256 check{others}"
            )
    return manifest


def load_trainer_state(path: Path) -> dict:
    """trainer.pt of a verified checkpoint (call `verify` first)."""
    file = Path(path) / TRAINER_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure means the same thing here)
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {TRAINER_FILE} does not load ({e})"
        ) from e
