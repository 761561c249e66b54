"""GPU-path behaviour that can be reproduced on a CPU: the attention kernel inside a graph, the current CUDA
device for `cuda:N`, the loud fallback of `--device auto`, and the prefix cache's auto size (free GPU memory)."""

from __future__ import annotations

import logging

import pytest
import torch

from model_store import modeling
from model_store.modeling import activate_device, load_prm, pick_device
from service.engine import device_setup
from service.engine.config import AUTO_PREFIX_CACHE_BYTES, EngineConfig
from service.engine.cuda_graphs import GraphRunner


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_prm(tiny_checkpoint, device="cpu")


def record_sdpa(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def test_graph_pass_runs_causal_sdpa_without_a_mask_even_when_transformers_would_build_one(tiny, monkeypatch):
    # Under capture, some transformers releases count the capture as tracing and materialise a [B, 1, T, T]
    # mask: another SDPA kernel than eager (no FlashAttention, other rounding). Simulate that: transformers
    # refuses to skip the mask. The graph pass must still hand SDPA no mask and is_causal=True.
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)
    calls = record_sdpa(monkeypatch)
    ids = torch.randint(3, tiny.model.backbone.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    flat = torch.tensor([5, 39, 41, 79])
    with torch.inference_mode():
        tiny.model.hidden_states(ids)  # what transformers does on its own here: a materialised mask
    assert calls and all(not no_mask for no_mask, _ in calls)  # the simulation bites
    calls.clear()
    for with_kv in (False, True):
        runner = GraphRunner(tiny.model, [(2, 64)], torch.device("cpu"), with_kv=with_kv, emulate=True)
        got = runner.maybe_run(ids, flat) if not with_kv else runner.maybe_run_with_kv(ids, flat)[0]
        layers = tiny.model.backbone.config.num_hidden_layers
        assert calls[-layers:] == [(True, True)] * layers
        monkeypatch.undo()  # the reference: plain eager transformers, unpatched
        with torch.inference_mode():
            expected = tiny.model.readout(tiny.model.hidden_states(ids)[0], flat)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)
        calls = record_sdpa(monkeypatch)


def test_cuda_n_becomes_the_current_device(monkeypatch):
    # Capture, Triton launches and tensors made without a device follow the current device: cuda:1 must be it.
    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: selected.append(torch.device(device)))
    activate_device(torch.device("cuda", 1))
    activate_device(torch.device("cpu"))
    assert selected == [torch.device("cuda", 1)]


def test_engine_start_makes_its_device_current(monkeypatch, tiny):
    seen = []
    monkeypatch.setattr(device_setup, "activate_device", lambda device: seen.append(device))
    assert device_setup.prepare_kernels(tiny.model, torch.device("cpu")) == "torch"
    assert seen == [torch.device("cpu")]


def test_device_auto_falls_back_loudly_when_the_driver_is_too_old(monkeypatch, caplog):
    # A CUDA build of torch on a host whose NVIDIA driver it cannot use: auto serves on the CPU, and says so.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(modeling, "nvidia_driver_present", lambda: True)
    with caplog.at_level(logging.ERROR, logger="model_store.modeling"):
        assert pick_device("auto") == torch.device("cpu")
    assert any("SERVING ON THE CPU" in r.message and "580" in r.message for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(modeling, "nvidia_driver_present", lambda: False)  # a CPU host: nothing to shout about
    with caplog.at_level(logging.ERROR, logger="model_store.modeling"):
        assert pick_device("auto") == torch.device("cpu")
    assert not caplog.records
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda:1")


def test_prefix_cache_auto_is_sized_from_free_gpu_memory_and_numbers_are_kept():
    auto, fixed = None, 256 * 2**20
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    free = 100 * 2**30  # an H200 after loading a model
    sized = device_setup.prefix_cache_bytes(auto, gpu, free_bytes=free)
    assert sized == int(free * device_setup.CACHE_SHARE_OF_FREE) > 100 * fixed
    assert device_setup.prefix_cache_bytes(auto, gpu, free_bytes=2**20) == AUTO_PREFIX_CACHE_BYTES  # never below
    assert device_setup.prefix_cache_bytes(auto, cpu, free_bytes=free) == AUTO_PREFIX_CACHE_BYTES == fixed
    assert device_setup.prefix_cache_bytes(0, gpu, free_bytes=free) == 0  # disabled stays disabled
    assert device_setup.prefix_cache_bytes(2**30, gpu, free_bytes=free) == 2**30  # set by hand: kept
    # 256 MiB asked for explicitly is 256 MiB, on a GPU too (it used to be read as "the default": auto).
    assert device_setup.prefix_cache_bytes(fixed, gpu, free_bytes=free) == fixed


def test_prefix_cache_auto_is_read_from_flags_and_environment(monkeypatch):
    from service.settings import ServerSettings

    monkeypatch.delenv("AGENTPRM_PREFIX_CACHE_BYTES", raising=False)
    assert ServerSettings().prefix_cache_bytes == "auto" and ServerSettings().engine_config().prefix_cache_bytes is None
    assert ServerSettings(prefix_cache_bytes=" Auto ").engine_config().prefix_cache_bytes is None
    assert ServerSettings(prefix_cache_bytes="268435456").engine_config().prefix_cache_bytes == 268435456
    assert ServerSettings(prefix_cache_bytes="0").engine_config().prefix_cache_bytes == 0
    monkeypatch.setenv("AGENTPRM_PREFIX_CACHE_BYTES", "1048576")
    assert ServerSettings().engine_config().prefix_cache_bytes == 2**20
    monkeypatch.setenv("AGENTPRM_PREFIX_CACHE_BYTES", "auto")
    assert ServerSettings().engine_config().prefix_cache_bytes is None
    for bad in ("-1", "lots", "1.5"):
        with pytest.raises(ValueError, match="expected auto or a number of bytes"):
            ServerSettings(prefix_cache_bytes=bad)


def test_engine_sizes_an_auto_cache_after_the_runner_is_built(tiny_checkpoint, monkeypatch):
    """Auto reads the free memory once the model, the graphs and the backend hold theirs, and the runner uses the
    cache the engine sized (a CPU engine: auto is the fixed size)."""
    from service.engine.engine import PRMEngine

    calls = []
    real = device_setup.prefix_cache_bytes

    def spy(configured, device, free_bytes=None):
        calls.append(configured)
        return real(configured, device, free_bytes)

    monkeypatch.setattr(device_setup, "prefix_cache_bytes", spy)
    engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu"))
    try:
        assert calls == [None] and engine.cache.max_bytes == AUTO_PREFIX_CACHE_BYTES
        assert engine.runner.cache is engine.cache
    finally:
        engine.close()


def test_serving_buckets_reach_further_and_pad_less():
    from service.engine.cuda_graphs import pick_bucket, serving_buckets

    buckets = serving_buckets()
    assert all(b * t <= 4096 for b, t in buckets)
    assert pick_bucket(buckets, 16, 256) == (16, 256) and pick_bucket(buckets, 4, 1024) == (4, 1024)
    worst = 1.0
    for length in range(1, 1025):  # a single sequence of every length: padding within 1.5x (from 32 on)
        bucket = pick_bucket(buckets, 1, length)
        assert bucket is not None
        if length >= 32:
            worst = max(worst, bucket[1] / length)
    assert worst <= 1.5
    assert sum(b * t for b, t in buckets) < 60_000  # the static KV the graphs keep: bounded
