"""Atomic checkpoints for long searches and trainings.

A checkpoint is one torch.save file written to a temporary name and renamed over the last
one, so an interrupted write never corrupts the last good checkpoint. It stores the settings
it was made with; resuming with different settings is an error, not a silent change.
"""
from __future__ import annotations

import os

import torch

from .files import atomic_path

KIND_KEY = "oes_fast_checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, another run's, another version)."""


def save(path, kind: str, settings: dict, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({KIND_KEY: kind, "version": VERSION, "settings": settings, "state": state}, tmp)


def load(path, kind: str, settings: dict) -> dict:
    """The saved state, after checking the file is a `kind` checkpoint made with `settings`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated): {exc}") from exc
    if not isinstance(data, dict) or data.get(KIND_KEY) != kind:
        raise CheckpointError(f"{path} is not an oes_fast {kind} checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}, expected {VERSION}")
    saved = data["settings"]
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise CheckpointError(f"{path} was made with other settings ({details}); start a new run instead")
    return data["state"]
