"""Checkpoint store for AgentPRM models.

A checkpoint is a directory (manifest.json, backbone/, value_head.safetensors, tokenizer/) whose every
file is listed with its sha256 in the manifest. This package reads and writes that format; it knows
nothing about serving or HTTP.
"""

from model_store.manifest import SCHEMA_VERSION, Manifest, Template
from model_store.store import CheckpointError, ModelStore, resolve_checkpoint

__all__ = ["SCHEMA_VERSION", "Manifest", "Template", "CheckpointError", "ModelStore", "resolve_checkpoint"]
