"""Resolve, list and verify checkpoints.

A store is a folder laid out as `STORE/<name>/<version>/manifest.json`. A reference is `name`
(newest version), `name:version`, or a path to a checkpoint directory. `verify_checkpoint` checks the
schema version and the sha256 of every listed file before anything is loaded; every failure is a
`CheckpointError` whose message names the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from model_store.manifest import MANIFEST_FILE, SUPPORTED_SCHEMA_VERSIONS, Manifest, sha256_file

# Files a checkpoint must have; weights must be safetensors.
REQUIRED_FILES = ("backbone/config.json", "value_head.safetensors", "tokenizer/tokenizer.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

PACKAGE_STORE = Path(__file__).resolve().parent / "checkpoints"


class CheckpointError(Exception):
    """A checkpoint cannot be resolved or fails verification. The message names the file."""


def default_store() -> Path:
    return Path(os.environ.get("AGENTPRM_STORE") or PACKAGE_STORE)


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass(frozen=True)
class StoreEntry:
    name: str
    version: str
    path: Path
    manifest: Manifest


class ModelStore:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_store()

    def entries(self) -> list[StoreEntry]:
        found = []
        if not self.root.is_dir():
            return found
        for manifest_path in sorted(self.root.glob(f"*/*/{MANIFEST_FILE}")):
            try:
                manifest = read_manifest(manifest_path.parent)
            except CheckpointError:
                continue
            # Addressed by folder names (STORE/name/version), which is what `resolve` reads.
            found.append(StoreEntry(manifest_path.parent.parent.name, manifest_path.parent.name, manifest_path.parent,
                                    manifest))
        return sorted(found, key=lambda e: (e.name, _version_key(e.version)))

    def resolve(self, ref: str) -> Path:
        name, _, version = ref.partition(":")
        base = self.root / name
        if not base.is_dir():
            known = sorted({e.name for e in self.entries()})
            raise CheckpointError(f"no model named {name!r} in store {self.root} (known: {', '.join(known) or 'none'}); "
                                  "--store DIR (AGENTPRM_STORE) names another store, or pass a checkpoint's path")
        if version:
            path = base / version
            if not (path / MANIFEST_FILE).is_file():
                raise CheckpointError(f"model {name!r} has no version {version!r} in store {self.root}")
            return path
        versions = [p.name for p in base.iterdir() if (p / MANIFEST_FILE).is_file()]
        if not versions:
            raise CheckpointError(f"model {name!r} in store {self.root} has no versions")
        return base / max(versions, key=_version_key)


def resolve_checkpoint(ref: str | Path, store: Path | str | None = None) -> Path:
    """A path to a checkpoint directory, from a path or a `name[:version]` in the store."""
    path = Path(ref).expanduser()
    if (path / MANIFEST_FILE).is_file():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: not a checkpoint directory ({MANIFEST_FILE} is missing)")
    return ModelStore(store).resolve(str(ref))


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    version = raw.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise CheckpointError(
            f"{path}: unknown schema_version {version!r}; this build reads {list(SUPPORTED_SCHEMA_VERSIONS)} "
            "(upgrade agentprm-serve to load it)"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{path}: invalid field {where!r}: {first['msg']}") from None


def verify_checkpoint(root: Path | str) -> Manifest:
    """Read the manifest and check every listed file against its sha256. Returns the manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    for rel in REQUIRED_FILES:
        if rel not in manifest.files:
            raise CheckpointError(f"{root / rel}: required file is not listed in {MANIFEST_FILE}")
    if not any(rel.startswith("backbone/") and rel.endswith(".safetensors") for rel in manifest.files):
        raise CheckpointError(f"{root / 'backbone'}: no *.safetensors weights listed in {MANIFEST_FILE}")
    for rel, expected in manifest.files.items():
        target = (root / rel).resolve()
        if root.resolve() not in target.parents:
            raise CheckpointError(f"{rel}: path escapes the checkpoint directory")
        if rel.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{root / rel}: pickle-based weight files are never loaded; convert to safetensors")
        if not target.is_file():
            raise CheckpointError(f"{root / rel}: listed in {MANIFEST_FILE} but missing")
        actual = sha256_file(target)
        if actual != expected:
            raise CheckpointError(
                f"{root / rel}: sha256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...); "
                "the file was modified or corrupted"
            )
    return manifest
