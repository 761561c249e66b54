"""`agentprm train`: every method trains from the same file into a checkpoint the service loads."""

from __future__ import annotations

import json

import pytest
import torch

from model_store.store import verify_checkpoint
from model_store.modeling import load_prm
from tests.training.synthetic import make_dataset
from training.cli import main
from training.data import file_sha256, write_jsonl

TINY = ["--layers", "1", "--hidden", "32", "--vocab", "600", "--max-seq-len", "512", "--no-progress"]


@pytest.fixture(scope="module")
def fork_data(tmp_path_factory):
    return write_jsonl(make_dataset(12, 4), tmp_path_factory.mktemp("data") / "fork.jsonl")


def losses(log):
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval"] for r in rows if "eval" in r]


@pytest.mark.parametrize("method", ["agentprm", "pvm", "orm", "mc"])
def test_every_method_trains_and_exports_a_servable_checkpoint(fork_data, tmp_path, method, capsys):
    out, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    argv = ["train", "--data", str(fork_data), "--method", method, "--out", str(out), "--epochs", "3",
            "--batch-size", "8", "--lr", "3e-3", "--log", str(log), "--mc-rollouts", "2",
            "--mc-env", "tests.training.synthetic:make_env", "--mc-policy", "random", *TINY]
    assert main(argv) == 0
    assert "wrote " in capsys.readouterr().out

    manifest = verify_checkpoint(out)
    training = manifest.training
    assert training.method == method
    assert (training.beta, training.gamma, training.lam) == ((1.0, 1.0, 0.95) if method == "agentprm" else
                                                             (None, None, None))
    assert training.data["sha256"] == file_sha256(fork_data) and training.data["n_trajectories"] == 48
    assert training.command.startswith("agentprm train --data") and f"--method {method}" in training.command
    assert {"auc", "brier", "loss", "tokens_per_s"} <= set(training.metrics)
    rows = [json.loads(line) for line in fork_data.read_text().splitlines()]
    expected_steps = sum(2 * len(r["steps"]) * (len(r["steps"]) - 1) for r in rows) if method == "mc" else 0
    assert training.model_extra["labelling"]["env_steps"] == expected_steps

    train_losses, evals = losses(log)
    assert len(train_losses) == training.metrics["train_steps"] > 0
    assert sum(train_losses[-3:]) < sum(train_losses[:3])  # it learned something in a few steps
    assert evals and evals[-1]["val_n"] == training.data["n_val"] > 0

    loaded = load_prm(out)
    assert loaded.model.hidden_size == 32


def test_bad_data_line_is_one_error_line_and_exit_2(tmp_path, capsys):
    rows = make_dataset(2, 1)
    rows[1]["steps"][0].pop("action")
    data = write_jsonl(rows, tmp_path / "bad.jsonl")
    assert main(["train", "--data", str(data), "--method", "agentprm", "--out", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: steps.0.action: missing" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_without_overwrite(fork_data, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert main(["train", "--data", str(fork_data), "--method", "pvm", "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_fine_tunes_a_hugging_face_folder_loading_its_safetensors(fork_data, tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from model_store.export import train_tokenizer

    hf = tmp_path / "hf"
    tokenizer = train_tokenizer(["<|im_start|>"], vocab_size=400)  # a foreign tokenizer without our markers
    config = Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024)
    torch.manual_seed(3)
    source = Qwen2ForCausalLM(config)
    source.save_pretrained(hf, safe_serialization=True)
    tokenizer.save(str(hf / "tokenizer.json"))

    def train(out):
        return main(["train", "--data", str(fork_data), "--method", "pvm", "--out", str(out), "--init", str(hf),
                     "--epochs", "1", "--lr", "0", "--warmup", "0", "--weight-decay", "0", "--no-progress",
                     "--max-seq-len", "512"])

    out = tmp_path / "ckpt"
    assert train(out) == 0  # lr 0: the exported backbone is the source model, plus the new marker rows
    loaded = load_prm(out)
    layer = "layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(loaded.model.backbone.state_dict()[layer], source.model.state_dict()[layer])
    embeddings = loaded.model.backbone.get_input_embeddings().weight
    assert embeddings.shape[0] >= tokenizer.get_vocab_size() + 5  # the template markers were added
    torch.testing.assert_close(embeddings[:100], source.model.embed_tokens.weight[:100])
    assert loaded.manifest.training.model_extra["init"] == f"hf:{hf}"

    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    assert train(tmp_path / "o2") == 2
    assert "pickle weights are never loaded" in capsys.readouterr().err


def test_same_seed_same_weights_other_seed_other_weights(fork_data, tmp_path):
    def weights(seed, name):
        out = tmp_path / name
        assert main(["train", "--data", str(fork_data), "--method", "agentprm", "--out", str(out), "--epochs", "1",
                     "--batch-size", "8", "--seed", str(seed), *TINY]) == 0
        return verify_checkpoint(out).files["backbone/model.safetensors"]

    first = weights(0, "a")
    assert weights(0, "b") == first
    assert weights(1, "c") != first
