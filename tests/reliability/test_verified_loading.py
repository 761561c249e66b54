"""`agentprm serve` refuses a bad checkpoint before it binds its port: a tampered file, an unknown schema
version, wrong tensor shapes. It exits 2 with one line naming the file and what is wrong, no traceback,
and it never got as far as listening (the server never starts half-loaded).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch
from safetensors.torch import save_file

from model_store.manifest import write_manifest
from model_store.store import read_manifest
from tests.conftest import REPO, free_port


def tamper(path):
    data = bytearray((path / "tokenizer" / "tokenizer.json").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    (path / "tokenizer" / "tokenizer.json").write_bytes(bytes(data))
    return r"tokenizer/tokenizer.json: sha256 mismatch"


def unknown_schema(path):
    raw = json.loads((path / "manifest.json").read_text())
    raw["schema_version"] = 999
    (path / "manifest.json").write_text(json.dumps(raw))
    return "manifest.json: unknown schema_version 999"


def wrong_shape(path):
    save_file({"weight": torch.zeros(1, 48), "bias": torch.zeros(1)}, str(path / "value_head.safetensors"))
    write_manifest(path, read_manifest(path))  # checksums agree: only the shapes are wrong
    return "value_head.safetensors: tensor 'weight' has shape (1, 48)"


def test_bad_checkpoints_are_refused_before_the_port_is_bound(tiny_checkpoint, tmp_path):
    runs = []
    for corrupt in (tamper, unknown_schema, wrong_shape):
        path = tmp_path / corrupt.__name__
        shutil.copytree(tiny_checkpoint, path)
        expected = corrupt(path)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(path), "--host",
                                 "127.0.0.1", "--port", str(port), "--device", "cpu"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs.append((corrupt.__name__, proc, port, str(path), expected))
    for name, proc, port, path, expected in runs:  # started together, checked one by one
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = err.decode(errors="replace")
        assert proc.returncode == 2, (name, err[-2000:])
        assert expected in err and path in err, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert b"serving" not in out and "Uvicorn running" not in err  # it never got as far as listening
