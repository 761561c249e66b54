"""Checkpoint format: manifest round trip, checksums, schema gate, store resolution, safe loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_store.manifest import Manifest, write_manifest
from model_store.store import CheckpointError, ModelStore, read_manifest, resolve_checkpoint, verify_checkpoint
from model_store.modeling import load_prm


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, path)
    return path


def test_manifest_round_trip(ckpt):
    manifest = read_manifest(ckpt)
    again = Manifest.model_validate_json(manifest.dump())
    assert again == manifest
    assert again.training.lam is None and "lambda" in json.loads(manifest.dump())["training"]
    assert set(manifest.files) >= {"backbone/config.json", "backbone/model.safetensors",
                                   "value_head.safetensors", "tokenizer/tokenizer.json"}
    assert verify_checkpoint(ckpt) == manifest


def test_tampered_weight_is_refused_naming_the_file(ckpt):
    weights = ckpt / "backbone" / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"backbone/model\.safetensors: sha256 mismatch"):
        load_prm(ckpt)


def test_unknown_schema_version_is_refused(ckpt):
    raw = json.loads((ckpt / "manifest.json").read_text())
    raw["schema_version"] = 99
    (ckpt / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown schema_version 99"):
        verify_checkpoint(ckpt)


def test_a_chat_template_is_refused_not_ignored(ckpt):
    raw = json.loads((ckpt / "manifest.json").read_text())
    raw["template"]["chat_template"] = "chatml"
    (ckpt / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"invalid field 'template\.chat_template'.*not supported"):
        read_manifest(ckpt)


def test_missing_listed_file_is_refused(ckpt):
    (ckpt / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer/tokenizer\.json: listed in manifest\.json but missing"):
        verify_checkpoint(ckpt)


def test_pickle_weights_are_never_loaded(ckpt):
    (ckpt / "backbone" / "pytorch_model.bin").write_bytes(b"not loaded")
    manifest = read_manifest(ckpt)
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle-based weight files are never loaded"):
        verify_checkpoint(ckpt)


def test_wrong_tensor_shape_is_refused_naming_file_and_tensor(ckpt):
    head = ckpt / "value_head.safetensors"
    save_file({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, str(head))
    write_manifest(ckpt, read_manifest(ckpt))  # checksums fine, shapes wrong
    with pytest.raises(CheckpointError, match=r"value_head\.safetensors: tensor 'weight' has shape \(1, 32\)"):
        load_prm(ckpt)


def test_store_resolves_name_version_and_path(tiny_checkpoint, tmp_path):
    for version in ("1", "2", "10"):
        shutil.copytree(tiny_checkpoint, tmp_path / "tiny-prm" / version)
    store = ModelStore(tmp_path)
    assert resolve_checkpoint("tiny-prm", tmp_path) == tmp_path / "tiny-prm" / "10"  # newest, numerically
    assert resolve_checkpoint("tiny-prm:2", tmp_path) == tmp_path / "tiny-prm" / "2"
    assert resolve_checkpoint(str(tiny_checkpoint), tmp_path) == tiny_checkpoint
    assert [e.version for e in store.entries()] == ["1", "2", "10"]
    with pytest.raises(CheckpointError, match="no version '3'"):
        resolve_checkpoint("tiny-prm:3", tmp_path)
    with pytest.raises(CheckpointError, match="no model named 'other'.*known: tiny-prm"):
        resolve_checkpoint("other", tmp_path)
