"""`agentprm model export --format vllm` for each backbone family of the public PRMs (default suite, no vLLM):
Llama (RLHFlow) and Mistral (Math-Shepherd) go out in the layout vLLM 0.32 loads for them (its
sequence-classification adapter over the causal LM: every backbone tensor under `model.`, the token pair folded
into one `score` row), GPT-NeoX and layouts vLLM lacks are refused in one line naming why; and the rows of vLLM's
STEP pooling are mapped to our readouts when the step tag also occurs as ordinary text. Whether vLLM then gives
our promises is the `vllm` tier's test (test_public_prms_vllm.py).
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from model_store.importers import import_value_model
from model_store.vllm_export import VllmExportError, architecture_name, step_rows_at_readouts
from service.cli import main
from tests.model_store import public_prms


@pytest.mark.parametrize("kind,architecture", [("rlhflow", "LlamaForTokenClassification"),
                                               ("math-shepherd", "MistralForTokenClassification")])
def test_llama_and_mistral_backbones_export_with_the_token_pair_as_one_score_row(tmp_path, capsys, kind,
                                                                                 architecture):
    public_prms.NATIVE[kind](tmp_path / "src")
    import_value_model(tmp_path / "src", tmp_path / "ckpt", name=kind)
    assert main(["model", "export", str(tmp_path / "ckpt"), str(tmp_path / "vllm")]) == 0
    out = capsys.readouterr().out
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["num_labels"] == 1
    assert f"({architecture}; step tag id" in out and '"pooling_type":"STEP"' in out
    assert "step_rows_at_readouts" in out  # the tag is ordinary text in these templates: say how rows map
    exported = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    source = load_file(str(tmp_path / "src" / "model.safetensors"))
    # Every backbone tensor of the source causal LM under the name vLLM's loader reads; no LM head.
    backbone = {k for k in source if k.startswith("model.")}
    assert set(exported) == backbone | {"score.weight", "score.bias"}
    for key in backbone:
        assert exported[key].equal(source[key].float()), key
    # The pair (+, -) of the LM head as one row: sigmoid(w_+ . h - w_- . h) is the 2-way softmax's P(+).
    head = load_file(str(tmp_path / "ckpt" / "value_head.safetensors"))
    rows = head["weight"]
    assert (exported["score.weight"][0] - (rows[1] - rows[0])).abs().max() < 1e-6
    lm_head = source["lm_head.weight"]
    assert sum(bool(lm_head[i].equal(rows[1])) for i in range(lm_head.shape[0])) == 1  # rows of the LM head
    assert exported["score.bias"].abs().max() == 0.0  # an LM head has no bias


def test_gpt_neox_exports_as_hf_lays_it_out_with_the_head_bias_folded_into_the_last_norm(tmp_path, capsys):
    """vLLM runs GPT-NeoX through its Transformers fallback (HF's GPTNeoXForSequenceClassification, whose score
    has no bias): the exported folder, loaded by transformers, gives our value head's promises."""
    import torch
    from transformers import GPTNeoXForSequenceClassification

    from model_store.modeling import load_prm

    public_prms.gpt_neox(tmp_path / "src")
    import_value_model(tmp_path / "src", tmp_path / "ckpt", name="neox")
    capsys.readouterr()
    assert main(["model", "export", str(tmp_path / "ckpt"), str(tmp_path / "vllm")]) == 0
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForTokenClassification"]
    exported = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    assert "score.bias" not in exported and all(k == "score.weight" or k.startswith("gpt_neox.") for k in exported)
    hf = GPTNeoXForSequenceClassification.from_pretrained(tmp_path / "vllm", dtype=torch.float32).eval()
    ours = load_prm(tmp_path / "ckpt", device="cpu", dtype=torch.float32)
    ids = torch.tensor([[3, 9, 4, 17, 8, 2, 11, 5, 6, 30, 7]])
    with torch.no_grad():
        theirs = torch.sigmoid(hf.score(hf.gpt_neox(ids).last_hidden_state))[0, :, 0]
        mine = ours.model.readout(ours.model.hidden_states(ids)[0], torch.arange(ids.shape[1]))  # every position
    assert (theirs - mine).abs().max() < 1e-5


def test_layouts_and_backbones_vllm_lacks_are_refused_in_one_line(tmp_path, capsys):
    public_prms.rlhflow(tmp_path / "llama")
    import_value_model(tmp_path / "llama", tmp_path / "llama-ckpt", name="llama")
    capsys.readouterr()  # (the source model's save progress)
    assert main(["model", "export", str(tmp_path / "llama-ckpt"), str(tmp_path / "out"), "--arch", "prm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("agentprm: error: --arch prm (ForProcessRewardModel) exists in vLLM 0.32 for Qwen2 backbones "
                   "only; a llama backbone exports as token_classify or seq_cls")
    assert not (tmp_path / "out").exists()
    with pytest.raises(VllmExportError, match="model_type 'gpt2' is not exported for vLLM"):
        architecture_name("gpt2", "token_classify")


def test_step_rows_are_picked_at_our_readouts_when_the_tag_is_ordinary_text():
    newline = 5
    #        task "a\nb"    step 1 "x\n"   step 2 "y\nz\n"
    ids = [1, 2, newline, 3, 4, newline, 6, newline, 7, newline]
    rows = [0.1, 0.2, 0.3, 0.4]  # vLLM: one row per newline token, in order
    assert step_rows_at_readouts(ids, (5, 9), newline, rows) == [0.2, 0.4]
    with pytest.raises(ValueError, match="3 STEP rows for 4 occurrences"):
        step_rows_at_readouts(ids, (5, 9), newline, rows[:3])
    with pytest.raises(ValueError, match=r"readouts \[4\] are not on the tag id"):
        step_rows_at_readouts(ids, (4, 9), newline, rows)
