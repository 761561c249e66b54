"""Fused gather + value head: promise logits at readout positions only.

Contract (every implementation): `hidden [R, H]` (float32 / bfloat16 / float16, last dim contiguous),
`flat_index [N]` (int64, rows of `hidden`), `weight [1, H]`, `bias [1]` -> logits `[N]` in **float32**,
accumulated in float32 whatever the input dtype. Only the N readout rows are read (gather first, then
project); the head never touches the other B*T - N positions.

Implementations:
- `value_head_readout_ref`: plain torch (gather the rows, upcast them, one [N, H] x [H] product). Used on
  the CPU, for training (it is differentiable) and as the ground truth in tests.
- `value_head_readout_triton` (model_store/triton_kernels.py): one Triton kernel that gathers and
  projects in a single pass. Used on a CUDA GPU when the `triton` package is installed. It never syncs
  with the GPU (CUDA-graph safe): an out-of-range index there gives a NaN logit, not an error.

`value_head_readout` is the dispatch that `PRMModel.readout` calls. The kernel is picked once at import:
Triton when `triton` is installed and CUDA is available, torch otherwise; `AGENTPRM_KERNEL=torch|triton`
overrides the pick and `set_kernel(name)` changes it at run time (tests, benchmarks). Per call, the Triton
kernel runs only on CUDA tensors (or any tensor under `TRITON_INTERPRET=1`) and only when no gradient is
needed: it has no backward, so a training step always takes the reference path.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

KERNELS = ("torch", "triton")
ENV_VAR = "AGENTPRM_KERNEL"


def value_head_readout_ref(hidden: torch.Tensor, flat_index: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor) -> torch.Tensor:
    """hidden [R, H], flat_index [N] (int64), weight [1, H], bias [1] -> float32 logits [N]."""
    # Upcast after the gather: only N rows are converted. A bf16 x bf16 product is exact in fp32, so the
    # result differs from the Triton kernel only by the order of the fp32 additions.
    rows = hidden.index_select(0, flat_index).float()  # [N, H]
    if torch.is_autocast_enabled(hidden.device.type):  # training under autocast: keep the head in fp32
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(rows, weight.float(), bias.float()).squeeze(-1)  # [N]
    return torch.nn.functional.linear(rows, weight.float(), bias.float()).squeeze(-1)  # [N]


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _find_triton()
_triton_impl = None  # value_head_readout_triton, imported on first use (importing triton costs ~0.3 s)


def _load_triton():
    global _triton_impl, HAS_TRITON
    if _triton_impl is None:
        try:
            from model_store.triton_kernels import value_head_readout_triton
        except Exception as exc:  # a broken triton install must not take the server down: fall back
            HAS_TRITON = False
            raise RuntimeError(f"the `triton` package is installed but cannot be imported ({exc})") from exc
        _triton_impl = value_head_readout_triton
    return _triton_impl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _check_name(name: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"unknown value-head kernel {name!r}: choose one of {', '.join(KERNELS)}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("the triton value-head kernel needs the `triton` package (pip install triton)")
    return name


def default_kernel() -> str:
    """The import-time pick: $AGENTPRM_KERNEL if set, else triton on a CUDA machine with triton, else torch."""
    requested = os.environ.get(ENV_VAR, "").strip().lower()
    if requested:
        return _check_name(requested)
    if HAS_TRITON and torch.cuda.is_available():
        try:
            _load_triton()
            return "triton"
        except RuntimeError as exc:
            log.warning("value-head kernel: falling back to torch: %s", exc)
    return "torch"


_active = default_kernel()


def active_kernel() -> str:
    return _active


def set_kernel(name: str) -> str:
    """Select the kernel ("torch" or "triton") for later calls; returns the previous selection."""
    global _active
    name = _check_name(name)
    if name == "triton":
        _load_triton()
    previous, _active = _active, name
    return previous


def kernel_for(hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """Which implementation `value_head_readout` uses for these tensors under the current selection."""
    if _active != "triton":
        return "torch"
    if not (hidden.is_cuda or interpreting()):
        return "torch"  # compiled Triton kernels run on CUDA tensors only
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return "torch"  # the kernel has no backward
    return "triton"


def _fall_back(reason: str) -> None:
    global _active
    if _active == "triton":
        log.warning("value-head kernel: Triton is unusable here, falling back to torch for every readout: %s", reason)
    _active = "torch"


def probe_triton(device: torch.device | str, hidden_size: int = 64, dtype: torch.dtype = torch.float32) -> str:
    """Compile and run the Triton kernel once on `device` (at start-up) and check it against the reference.

    Importing `triton` proves nothing: the first launch builds a C launcher, which needs a C compiler and the
    Python headers (the GPU image must carry both). If the build or the run fails, or the result is wrong,
    the selection falls back to torch with one warning, so every later batch takes the reference path
    instead of raising. Returns the kernel in use afterwards ("torch" or "triton")."""
    device = torch.device(device)
    if _active != "triton" or not (device.type == "cuda" or interpreting()):
        return _active
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, hidden_size, generator=g).to(device, dtype)  # [7, H]
    index = torch.tensor([0, 3, 6], device=device)  # [3]
    weight = torch.randn(1, hidden_size, generator=g).to(device, torch.float32)  # [1, H]
    bias = torch.randn(1, generator=g).to(device, torch.float32)
    try:
        got = _load_triton()(hidden, index, weight, bias)
        expected = value_head_readout_ref(hidden, index, weight, bias)
        if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"the kernel's logits differ from the reference by {(got - expected).abs().max():.2e}")
    except Exception as exc:  # any failure to build or run the kernel: the torch path is always correct
        _fall_back(f"{type(exc).__name__}: {exc}")
    return _active


# Readout counts that reach every BLOCK_N block_sizes() picks (it halves BLOCK_N until >= 128 programs), each
# as a multiple of 16 and not (Triton specialises integer arguments on divisibility by 16), and N = 1.
WARM_READOUTS = (1, 16, 17, 256, 257, 512, 513, 1024, 1025, 2048, 2049)


def warm_triton(device: torch.device | str, hidden_size: int, dtype: torch.dtype) -> int:
    """Compile the kernel variants live requests will need before the first one arrives (start-up).

    Triton compiles one binary per block-size pair and per integer specialisation (a size of 1, a multiple
    of 16, anything else): readout counts that cover every BLOCK_N `block_sizes` picks, in both
    specialisations, over row counts of both kinds. Returns the number of launches (0 when not on Triton)."""
    device = torch.device(device)
    if _active != "triton" or device.type != "cuda":
        return 0
    counts = WARM_READOUTS
    weight = torch.zeros(1, hidden_size, device=device, dtype=torch.float32)  # [1, H]: the head is fp32
    bias = torch.zeros(1, device=device, dtype=torch.float32)
    launches = 0
    for rows in (max(counts) + 16 - max(counts) % 16, max(counts) + 1):  # a multiple of 16, and not
        hidden = torch.zeros(rows, hidden_size, device=device, dtype=dtype)  # [R, H]
        for n in counts:
            value_head_readout(hidden, torch.arange(n, device=device), weight, bias)
            launches += 1
    torch.cuda.synchronize(device)
    return launches


def value_head_readout(hidden: torch.Tensor, flat_index: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """Dispatch: hidden [R, H], flat_index [N], weight [1, H], bias [1] -> float32 logits [N]."""
    if kernel_for(hidden, weight) == "triton":
        try:
            return _load_triton()(hidden, flat_index, weight, bias)
        except (ValueError, TypeError, IndexError):
            raise  # bad input: the caller's error, not the kernel's
        except Exception as exc:  # a launcher that cannot be built (no compiler), a driver error: fall back once
            _fall_back(f"{type(exc).__name__}: {exc}")
    return value_head_readout_ref(hidden, flat_index, weight, bias)
