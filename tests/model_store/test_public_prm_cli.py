"""`agentprm model import` says what it detected and which template it chose; `agentprm model export --format
vllm` writes a folder and the `vllm serve` line; /v1/models shows head kind, template kind and provenance."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from safetensors.torch import load_file

from model_store.importers import KINDS, import_value_model
from service.api.app import create_app
from service.cli import IMPORT_KINDS, main
from service.engine.engine import EngineConfig, PRMEngine
from tests.model_store import public_prms


def test_cli_kinds_are_the_importer_kinds():
    assert IMPORT_KINDS == KINDS


def test_import_prints_the_detected_kind_and_the_native_template(tmp_path, capsys):
    public_prms.qwen_prm(tmp_path / "src")
    assert main(["model", "import", str(tmp_path / "src"), str(tmp_path / "out"), "--name", "qprm"]) == 0
    out = capsys.readouterr().out
    assert "detected kind qwen-prm: tensors score.0 / score.2" in out
    assert "head: mlp (2 output(s)), activation sigmoid" in out
    assert "template: native (qwen-prm)" in out and "'<extra_0>'" in out
    assert "tokenization: segment-wise ids equal the whole-text ids" in out


def test_import_with_kind_forced_says_so_and_a_bad_source_is_one_line(tmp_path, capsys):
    public_prms.trl_prm(tmp_path / "src")
    assert main(["model", "import", str(tmp_path / "src"), str(tmp_path / "out"), "--name", "t",
                 "--kind", "trl-prm", "--step-separator", "\n\n"]) == 0
    out = capsys.readouterr().out
    assert "forced kind trl-prm" in out and "readout at the last token of '\\n\\n'" in out
    assert main(["model", "import", str(tmp_path / "src"), str(tmp_path / "bad"), "--name", "b",
                 "--kind", "math-shepherd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agentprm: error:") and "lm_head.weight" in err and "Traceback" not in err


def test_models_route_shows_head_template_and_provenance(tmp_path, tiny_checkpoint):
    public_prms.skywork(tmp_path / "src")
    import_value_model(tmp_path / "src", tmp_path / "out", name="sky")
    for path, head, template, method in ((tmp_path / "out", "linear", "native", "imported:skywork"),
                                         (tiny_checkpoint, "linear", "marker", None)):
        engine = PRMEngine.from_checkpoint(path, EngineConfig(device="cpu"))
        with TestClient(create_app(engine)) as client:
            card = client.get("/v1/models").json()["data"][0]
        assert card["head_kind"] == head and card["template_kind"] == template
        if method:
            assert card["template_family"] == "skywork"
            assert card["provenance"]["method"] == method
            assert card["provenance"]["source"] == str((tmp_path / "src").resolve())
        else:
            assert card["provenance"]["method"] == card["method"]


def test_export_vllm_writes_the_folder_and_the_serve_line(tmp_path, capsys):
    public_prms.trl_prm(tmp_path / "src")
    import_value_model(tmp_path / "src", tmp_path / "ckpt", name="t")
    assert main(["model", "export", str(tmp_path / "ckpt"), str(tmp_path / "vllm"), "--format", "vllm"]) == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "vllm" / "agentprm_vllm.json").read_text())
    assert f"vllm serve {tmp_path / 'vllm'} --runner pooling --dtype float32" in out
    assert f'"pooling_type":"STEP","step_tag_id":{meta["end_id"]},"use_activation":true' in out
    # The two-class head goes out as the one-output head it equals: w_pos - w_neg.
    head = load_file(str(tmp_path / "ckpt" / "value_head.safetensors"))
    score = load_file(str(tmp_path / "vllm" / "model.safetensors"))["score.weight"]
    assert score.shape == (1, head["weight"].shape[1])
    assert (score[0] - (head["weight"][1] - head["weight"][0])).abs().max() < 1e-6
    assert main(["model", "export", str(tmp_path / "ckpt"), str(tmp_path / "vllm")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_export_of_an_mlp_head_needs_the_prm_layout(tmp_path, capsys):
    public_prms.qwen_prm(tmp_path / "src")
    import_value_model(tmp_path / "src", tmp_path / "ckpt", name="q")
    assert main(["model", "export", str(tmp_path / "ckpt"), str(tmp_path / "tc")]) == 2
    assert "--arch prm" in capsys.readouterr().err
    assert main(["model", "export", str(tmp_path / "ckpt"), str(tmp_path / "prm"), "--arch", "prm"]) == 0
    weights = load_file(str(tmp_path / "prm" / "model.safetensors"))
    head = load_file(str(tmp_path / "ckpt" / "value_head.safetensors"))
    assert (weights["score.2.weight"] == head["fc2.weight"]).all()

