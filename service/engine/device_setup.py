"""Start-up work on the serving device, done once before the first request (service.engine.engine calls it).

- `--device cuda:N`: makes N the current CUDA device, so graph capture, Triton launches and tensors made
  without an explicit device go to N, not to device 0 (model_store.modeling.activate_device).
- the value-head kernel: probe-compiles Triton (model_store.kernels.probe_triton) and falls back to torch
  with a warning when it cannot build (an image without a C compiler or Python headers); when Triton stays,
  compiles the variants live requests need (warm_triton), so no request pays a compile.
- the prefix cache's size when left to auto: on a GPU, from the memory left after the model, the graphs and the
  backend (`prefix_cache_bytes`).
Nothing here runs on a CPU except the choice of kernel (always torch there, unless TRITON_INTERPRET=1).
"""

from __future__ import annotations

import logging
import time

import torch

from model_store import kernels
from model_store.modeling import activate_device
from service.engine.config import AUTO_PREFIX_CACHE_BYTES

log = logging.getLogger("agentprm.engine")

# On a GPU the prefix cache takes this share of the device memory free after the model and the graphs: the
# rest stays for the passes' activations and the allocator's slack.
CACHE_SHARE_OF_FREE = 0.4


def prepare_kernels(model, device: torch.device) -> str:
    """Make `device` current, then probe and warm the value-head kernel; returns the kernel in use."""
    activate_device(device)
    dtype = next(model.backbone.parameters()).dtype
    kernel = kernels.probe_triton(device, model.hidden_size, dtype)
    if kernel == "triton" and device.type == "cuda":
        start = time.perf_counter()
        launches = kernels.warm_triton(device, model.hidden_size, dtype)
        log.info("value-head kernel: triton, %d variants compiled in %.2f s", launches, time.perf_counter() - start)
    else:  # torch on a CPU is the expected case: said at debug level (the start line stays the only one)
        (log.debug if device.type == "cpu" else log.info)("value-head kernel: %s", kernel)
    return kernel


def prefix_cache_bytes(configured: int | None, device: torch.device, free_bytes: int | None = None) -> int:
    """The prefix cache's byte bound. A number is kept as set (0: no cache). None (auto): on a GPU,
    CACHE_SHARE_OF_FREE of the device memory free now (call it after the model, the graphs and the backend took
    theirs; a fixed 256 MiB holds ~4.6k tokens of a 7B model's KV, whatever the GPU), never less than
    AUTO_PREFIX_CACHE_BYTES; elsewhere AUTO_PREFIX_CACHE_BYTES."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return AUTO_PREFIX_CACHE_BYTES
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    sized = max(AUTO_PREFIX_CACHE_BYTES, int(free_bytes * CACHE_SHARE_OF_FREE))
    log.info("prefix cache: auto, %.0f MiB (%.0f%% of %.0f MiB free on %s)", sized / 2**20,
             CACHE_SHARE_OF_FREE * 100, free_bytes / 2**20, device)
    return sized
