"""Triton kernel for the fused readout gather + value head (imported only when `triton` is installed).

`value_head_readout_triton(hidden [R, H], flat_index [N], weight [1, H], bias [1]) -> float32 logits [N]`
computes `logits[n] = hidden[flat_index[n]] . weight[0] + bias[0]` in one pass: each program gathers a
block of readout rows straight from the hidden states (no [N, H] copy is materialised), dots them with
the head in BLOCK_H chunks and adds the bias. Inputs may be float32, bfloat16 or float16; loads are upcast
and accumulated in float32, and the output is float32, like `kernels.value_head_readout_ref`.

Runs on CUDA tensors, or on CPU tensors when the process set TRITON_INTERPRET=1 before importing this
module (tests). The launcher never synchronises with the GPU, so a CUDA graph can hold it. Indices are
bounds-checked on the host only when they live on the host (free there); on the GPU the kernel never reads
outside `hidden`: an out-of-range index yields a NaN logit (the torch reference raises a device-side assert,
which poisons the CUDA context; a synchronising check per call would cost a round trip).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# A [BLOCK_N, BLOCK_H] fp32 tile of at most 4096 elements is 32 registers per thread at 4 warps.
_MAX_TILE = 4096
_MAX_BLOCK_H = 1024
_MAX_BLOCK_N = 16
# Keep at least this many programs in flight before packing several rows per program: readout counts
# are small (tens to a few thousand), and one row per program spreads them over every SM.
_MIN_PROGRAMS = 128
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _value_head_readout_kernel(hidden_ptr, index_ptr, weight_ptr, bias_ptr, out_ptr,
                               n_readouts, n_rows, hidden_size, stride_row,
                               BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] readout numbers
    out_mask = rows < n_readouts
    # int64 offsets: B*T*H passes 2**31 for long batches of wide models.
    src = tl.load(index_ptr + rows, mask=out_mask, other=0).to(tl.int64)  # [BLOCK_N] hidden rows
    in_bounds = (src >= 0) & (src < n_rows)
    row_mask = out_mask & in_bounds  # never read outside hidden, whatever the index says
    row_ptrs = hidden_ptr + src * stride_row  # [BLOCK_N]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, hidden_size, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        col_mask = cols < hidden_size  # H need not be a power of two
        w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BLOCK_H]
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_H]
        acc += tl.sum(x * w[None, :], axis=1)
    bias = tl.load(bias_ptr).to(tl.float32)
    # float32 out: a bf16 logit would lose ~3 significant digits for nothing (N is small), and the
    # interpreter's fp32 -> bf16 cast truncates where the compiled one rounds, so tests could not pin it.
    logits = tl.where(in_bounds, acc + bias, float("nan"))
    tl.store(out_ptr + rows, logits, mask=out_mask)


def _no_device_change():
    return contextlib.nullcontext()


def block_sizes(n_readouts: int, hidden_size: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_H): one chunk covers H up to 1024; rows per program only once the grid is full."""
    block_h = min(triton.next_power_of_2(hidden_size), _MAX_BLOCK_H)
    block_n = max(1, min(_MAX_BLOCK_N, _MAX_TILE // block_h))
    while block_n > 1 and triton.cdiv(n_readouts, block_n) < _MIN_PROGRAMS:
        block_n //= 2
    return block_n, block_h


def _check(hidden: torch.Tensor, flat_index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
           check_bounds: bool) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [rows, H], got shape {tuple(hidden.shape)}")
    rows, size = hidden.shape
    if flat_index.dim() != 1:
        raise ValueError(f"flat_index must be [N], got shape {tuple(flat_index.shape)}")
    if tuple(weight.shape) != (1, size):
        raise ValueError(f"weight must be [1, {size}], got {tuple(weight.shape)}")
    if bias.numel() != 1:
        raise ValueError(f"bias must have one element, got shape {tuple(bias.shape)}")
    if flat_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"flat_index must be int64 (or int32), got {flat_index.dtype}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    devices = {t.device for t in (hidden, flat_index, weight, bias)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if hidden.stride(1) != 1 and size > 1:
        raise ValueError("hidden must be contiguous along H (rows may be strided)")
    if not (weight.is_contiguous() and flat_index.is_contiguous()):
        raise ValueError("weight and flat_index must be contiguous")
    if check_bounds and flat_index.numel():
        lo, hi = int(flat_index.min()), int(flat_index.max())
        if lo < 0 or hi >= rows:
            raise IndexError(f"flat_index holds {lo if lo < 0 else hi}, outside the {rows} hidden rows")


def value_head_readout_triton(hidden: torch.Tensor, flat_index: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor, check_bounds: bool | None = None) -> torch.Tensor:
    """hidden [R, H], flat_index [N], weight [1, H], bias [1] -> float32 logits [N] (one kernel launch).

    `check_bounds` (default: only for host tensors) raises IndexError for an index outside hidden's rows;
    without it such an index gives a NaN logit.
    """
    if check_bounds is None:
        check_bounds = flat_index.device.type == "cpu"
    _check(hidden, flat_index, weight, bias, check_bounds)
    n = flat_index.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
    if n == 0:
        return out
    block_n, block_h = block_sizes(n, hidden.shape[1])
    grid = (triton.cdiv(n, block_n),)
    rows, size = hidden.shape
    # Triton launches on the current CUDA device: a tensor on cuda:1 needs cuda:1 current (a no-op when it is).
    with torch.cuda.device(hidden.device) if hidden.is_cuda else _no_device_change():
        _value_head_readout_kernel[grid](hidden, flat_index, weight, bias, out, n, rows, size, hidden.stride(0),
                                         BLOCK_N=block_n, BLOCK_H=block_h, num_warps=4)
    return out
