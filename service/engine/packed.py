"""Packed forward for Qwen2-architecture backbones: no padding, fused projections, one RoPE table.

The transformers forward takes a padded [B, T] batch: on a CPU every pad token costs as much as a real one
(W1-style batches of trajectories of different lengths carry 20-35% padding), and a small model spends much
of its time in per-op overhead (separate q/k/v and gate/up projections, RoPE recomputed on every call).
On a CPU the projections run through oneDNN with weights reordered once (`_Linear`).
`PackedQwen2` computes the same function on the concatenation of the sequences ([N, H], N = total real
tokens): every projection is one matmul over all tokens (q|k|v and gate|up fused), and only attention runs
per sequence (SDPA, causal within the sequence, against an optional shared past: a rerank's task, a beam's
history, a cached prefix), or with `attention="varlen"` (the default on a GPU) in one masked call per layer
over every token, each distinct past attended once (FlexAttention's block-sparse kernel on CUDA, SDPA with
the same dense mask elsewhere). The same code serves the CPU and the GPU. Numerically it is the transformers Qwen2 forward up to float rounding (the test
suite checks <= 1e-5 on random checkpoints).

On a CPU in bf16 (`--dtype bfloat16`) only the four projections per layer run in bf16 (oneDNN's bf16 kernels); the
residual stream, RMSNorm, RoPE, attention and the final norm stay fp32, and the KV handed out (and cached) is
bf16. Rounding then enters only at the projections' inputs and outputs, which keeps the promises within the
tested bound of fp32 (tests/service/engine/test_dtype.py); attention in fp32 is also the faster one on a CPU
without AMX (bench/ANALYSIS.md).

It shares the backbone's parameters (the fused q|k|v and gate|up weights are concatenated copies), so it is
built once per loaded model. `supports(config)` says whether a config is within what it implements
(Qwen2, full attention, default RoPE); otherwise the runner keeps the transformers path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [1, kv_heads, P, head_dim]


def supports(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or {}
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window", False)
            and rope.get("rope_type", "default") == "default" and all(t == "full_attention" for t in layer_types)
            and getattr(config, "hidden_act", "silu") == "silu")


ROW_BUCKET = 64


class _Linear:
    """y = x W^T + b. On a CPU with oneDNN, the weight is reordered once into oneDNN's blocked layout and
    multiplied by oneDNN (15-30% faster than the default BLAS path at the shapes of a scoring pass, measured
    by bench/cpu_kernels.py); elsewhere, or if oneDNN refuses the weight, F.linear. Rows are padded to a multiple
    of ROW_BUCKET: oneDNN keeps native state for every input shape it sees, and unbounded shapes (every pass
    has its own token count) grew the process by ~70 MiB per 20 batches without bound (bench/SOAK.md)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool):
        self.weight, self.bias = weight, bias
        self.packed = None
        if onednn:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                probe = torch.randn(3, weight.shape[1], dtype=weight.dtype)
                got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "").float()
                want = F.linear(probe.float(), weight.float(), None if bias is None else bias.float())
                # fp32: the same sums in another order; bf16: also the output rounded to 8 bits of mantissa.
                tol = 1e-3 if weight.dtype == torch.float32 else 2e-2
                if torch.allclose(got, want, atol=tol * want.abs().max().item() + tol, rtol=tol):
                    self.packed = packed
            except (RuntimeError, AttributeError):  # no oneDNN op for this build or dtype
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            rows = x.shape[0]
            bucket = -(-rows // ROW_BUCKET) * ROW_BUCKET
            if bucket != rows:  # a bounded set of shapes: oneDNN keeps native state per input shape
                x = F.pad(x, (0, 0, 0, bucket - rows))
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")[:rows]
        return F.linear(x, self.weight, self.bias)


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    # bf16: oneDNN's AVX512-BF16 / AMX kernels; the measured speed-up is what --dtype auto checks first.
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class _Layer:
    def __init__(self, layer: nn.Module, onednn: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _Linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
                           torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach(), onednn)
        self.o = _Linear(attn.o_proj.weight.detach(), None, onednn)
        self.gate_up = _Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), None, onednn)
        self.down = _Linear(mlp.down_proj.weight.detach(), None, onednn)
        self.ln1 = layer.input_layernorm.weight.detach()
        self.ln2 = layer.post_attention_layernorm.weight.detach()


ATTENTION = ("units", "varlen")


@dataclass
class _Varlen:
    """One attention call over every token of a pass: keys = [each distinct past once, then the new tokens].
    A query may see the keys of the past its sequence continues and its own sequence's earlier tokens."""
    pasts: list[KV]  # the distinct pasts, in key order
    q_seq: torch.Tensor  # [N] sequence of each query token
    q_pos: torch.Tensor  # [N] its position among its sequence's new tokens
    q_past: torch.Tensor  # [N] index of the past its sequence continues, -1 for none
    kv_past: torch.Tensor  # [K] index of the past a key belongs to, -2 for new tokens
    kv_seq: torch.Tensor  # [K] sequence of a new token's key, -1 for past keys
    kv_pos: torch.Tensor  # [K] position of a new token's key, -1 for past keys
    block_mask: object | None = None  # flex_attention's BlockMask of `allowed` (CUDA), else None
    dense: torch.Tensor | None = None  # [N, K] bool, made once per pass for SDPA

    def allowed(self, q, k):
        """The mask as a function of query and key indices (broadcasting tensors, or flex's scalars)."""
        own = (self.kv_seq[k] == self.q_seq[q]) & (self.kv_pos[k] <= self.q_pos[q])
        return (self.kv_past[k] == self.q_past[q]) | own


def varlen_layout(lengths: list[int], pasts: list[KV | None], device, block_sparse: bool = False) -> _Varlen:
    """The one-call attention layout of sequences of `lengths` tokens, each continuing pasts[s] (None: none).
    Pasts are told apart by identity: sequences that continue the same object share its keys. With
    `block_sparse`, also FlexAttention's block mask (CUDA); otherwise the dense mask is made at first use."""
    distinct: dict[int, int] = {}
    unique: list[KV] = []
    for past in pasts:
        if past is not None and id(past) not in distinct:
            distinct[id(past)] = len(unique)
            unique.append(past)
    n = sum(lengths)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [N]
    pos = torch.cat([torch.arange(length) for length in lengths])  # [N]
    q_past = torch.tensor([distinct[id(p)] if p is not None else -1 for p in pasts])[seq]  # [N]
    past_keys = sum(p[0][0].shape[2] for p in unique)
    kv_past = torch.cat([*(torch.full((p[0][0].shape[2],), i) for i, p in enumerate(unique)),
                         torch.full((n,), -2)])  # [K]
    layout = _Varlen(unique, seq.to(device), pos.to(device), q_past.to(device), kv_past.to(device),
                     torch.cat([torch.full((past_keys,), -1), seq]).to(device),
                     torch.cat([torch.full((past_keys,), -1), pos]).to(device))
    if block_sparse:
        from torch.nn.attention.flex_attention import create_block_mask

        layout.block_mask = create_block_mask(lambda b, h, q, k: layout.allowed(q, k), None, None, n,
                                              past_keys + n, device=device)
    return layout


def attend_varlen(layout: _Varlen, li: int, q, k, v, flex=None, scale: float | None = None) -> torch.Tensor:
    """q [N, nh, hd], k/v [N, kvh, hd] (the new tokens of layer li) -> [N, nh, hd]: every token in one call, each
    distinct past's keys concatenated once (never once per sequence). `flex`: FlexAttention with the layout's
    block mask; otherwise SDPA with its dense [N, K] mask. `scale`: None is 1/sqrt(hd)."""
    keys = torch.cat([p[li][0] for p in layout.pasts] + [k.transpose(0, 1).unsqueeze(0)], dim=2)  # [1, kvh, K, hd]
    values = torch.cat([p[li][1] for p in layout.pasts] + [v.transpose(0, 1).unsqueeze(0)], dim=2)
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # KV kept in the projections' dtype
    query = q.transpose(0, 1).unsqueeze(0)  # [1, nh, N, hd]
    gqa = q.shape[1] != k.shape[1]
    if layout.block_mask is not None and flex is not None:
        out = flex(query, keys, values, block_mask=layout.block_mask, enable_gqa=gqa, scale=scale)
    else:
        if layout.dense is None:
            layout.dense = layout.allowed(torch.arange(query.shape[2], device=query.device)[:, None],
                                          torch.arange(keys.shape[2], device=query.device)[None, :])  # [N, K]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=layout.dense, enable_gqa=gqa,
                                             scale=scale)
    return out[0].transpose(0, 1)  # [N, nh, hd]


def _flex_attention(compiled: bool):
    """flex_attention, compiled for the GPU (block-sparse: masked-out blocks cost nothing); None if unavailable.
    Uncompiled it runs the dense reference (tests on the CPU)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=True) if compiled else flex_attention


class PackedQwen2:
    def __init__(self, backbone: nn.Module, onednn: bool | None = None, attention: str = "auto",
                 flex: bool | None = None):
        config = backbone.config
        if not supports(config):
            raise ValueError("PackedQwen2 supports Qwen2 with full attention and default RoPE only")
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed = backbone.embed_tokens.weight.detach()
        self.norm = backbone.norm.weight.detach()
        self.dtype = self.embed.dtype
        # On a CPU a bf16 model runs only its projections in bf16 (fp32 everywhere else, see the module docstring);
        # on a GPU everything runs in the model's dtype, as before.
        self.compute_dtype = torch.float32 if self.embed.device.type == "cpu" else self.dtype
        if onednn is None:
            onednn = onednn_available(self.embed.device, self.dtype)
        self.layers = [_Layer(layer, onednn) for layer in backbone.layers]
        self.onednn = onednn and all(lin.packed is not None for layer in self.layers
                                     for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        theta = config.rope_parameters.get("rope_theta", 10000.0)
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(torch.float32) / self.head_dim
        self.inv_freq = (1.0 / (theta ** exponent)).to(self.embed.device)  # [hd/2], as transformers computes it
        self._cos = self._sin = torch.empty(0, self.head_dim, device=self.embed.device)
        self._grow_rope(max(2048, int(getattr(config, "max_position_embeddings", 2048))))
        # units: one SDPA call per sequence (or per run of short sequences on one past); on a CPU the per-call
        # cost is small next to the matmuls. varlen: one masked call per layer for the whole pass, each distinct
        # past attended once; on a GPU, where per-sequence launches dominate many short sequences.
        if attention == "auto":
            attention = "varlen" if self.embed.device.type == "cuda" else "units"
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
        self.attention = attention
        on_gpu = self.embed.device.type == "cuda"
        self._flex = _flex_attention(compiled=on_gpu) if attention == "varlen" and (on_gpu if flex is None else flex) \
            else None

    def _grow_rope(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = positions[:, None] * self.inv_freq[None, :]  # [L, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [L, hd]
        self._cos, self._sin = emb.cos().to(self.compute_dtype), emb.sin().to(self.compute_dtype)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """RMSNorm of the fp32 residual, computed in fp32; the result written in `out_dtype` (the projections'
        dtype) by the last multiply itself, not by a separate cast."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if out_dtype is None or out_dtype == x.dtype:
            return weight * x32.to(x.dtype)  # transformers' order (an fp32 result for the fp32 residual)
        return torch.mul(x32, weight, out=torch.empty(x32.shape, dtype=out_dtype, device=x32.device))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _units(self, lengths: list[int], offsets: list[int], pasts: list[KV | None], device) -> list[tuple]:
        """Attention units: a sequence without a past attends causally to itself; consecutive short sequences
        that continue the same past (the same object) attend together to it, each to its own tokens only
        (one SDPA call with a mask instead of one per sequence, and the past concatenated once)."""
        units, i = [], 0
        while i < len(lengths):
            j = i + 1
            if pasts[i] is not None:
                # A unit's masked attention costs n_u * (P + n_u): worth it while the unit's tokens stay
                # within max(P, 128) (short candidates on a long history); long suffixes run one by one.
                limit, tokens = max(pasts[i][0][0].shape[2], 128), lengths[i]
                while j < len(lengths) and pasts[j] is pasts[i] and tokens + lengths[j] <= limit:
                    tokens += lengths[j]
                    j += 1
            lo, hi = offsets[i], offsets[j]
            if pasts[i] is None:
                units.append((lo, hi, None, None))
            else:
                p = pasts[i][0][0].shape[2]
                seg = torch.repeat_interleave(torch.arange(j - i), torch.tensor(lengths[i:j]))  # [n]
                pos = torch.cat([torch.arange(n) for n in lengths[i:j]])  # [n]
                own = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])  # [n, n]
                mask = torch.cat([torch.ones(hi - lo, p, dtype=torch.bool), own], dim=1).to(device)  # [n, p+n]
                units.append((lo, hi, pasts[i], mask))
            i = j
        return units

    def _varlen(self, lengths: list[int], pasts: list[KV | None], device) -> _Varlen:
        return varlen_layout(lengths, pasts, device, block_sparse=self._flex is not None)

    def _attend_varlen(self, layout: _Varlen, li: int, q, k, v) -> torch.Tensor:
        return attend_varlen(layout, li, q, k, v, flex=self._flex)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, lengths: list[int], keep_kv: bool = False,
                pasts: list[KV | None] | None = None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """ids [N] (sequences concatenated, lengths summing to N). Each sequence continues `pasts[s]` (per
        layer [1, kv_heads, P_s, hd]; None or no `pasts`: from position 0). Returns hidden
        [N, H] after the final norm and, with `keep_kv`, the new tokens' KV per layer as [N, kv_heads, hd]
        (keys after RoPE)."""
        n = ids.shape[0]
        if pasts is None:
            pasts = [None] * len(lengths)
        if len(pasts) != len(lengths):
            raise ValueError(f"{len(pasts)} pasts for {len(lengths)} sequences")
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        if offsets[-1] != n:
            raise ValueError(f"lengths sum to {offsets[-1]}, ids hold {n} tokens")
        starts = [pk[0][0].shape[2] if pk is not None else 0 for pk in pasts]
        longest = max(p + length for p, length in zip(starts, lengths))
        if longest > self._cos.shape[0]:
            self._grow_rope(2 * longest)
        positions = torch.cat([torch.arange(p, p + length) for p, length in zip(starts, lengths)]).to(ids.device)
        cos, sin = self._cos[positions][:, None, :], self._sin[positions][:, None, :]  # [N, 1, hd]
        varlen = self._varlen(lengths, pasts, ids.device) if self.attention == "varlen" else None
        units = [] if varlen is not None else self._units(lengths, offsets, pasts, ids.device)
        nh, kvh, hd = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = nh * hd, kvh * hd
        gqa = nh != kvh
        wdt, cdt = self.dtype, self.compute_dtype  # projections' dtype; everything else (no-op casts when equal)
        x = self.embed[ids].to(cdt)  # [N, H], the residual stream
        kept = []
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer.ln1, wdt)
            qkv = layer.qkv(h)  # [N, (nh + 2 kvh) hd]
            q = self._rotate(qkv[:, :q_size].to(cdt).view(n, nh, hd), cos, sin)  # [N, nh, hd]
            k = self._rotate(qkv[:, q_size:q_size + kv_size].to(cdt).view(n, kvh, hd), cos, sin)  # [N, kvh, hd]
            k = k.to(wdt)  # the KV is kept (and cached) in the projections' dtype
            v = qkv[:, q_size + kv_size:].view(n, kvh, hd)
            if keep_kv:
                kept.append((k, v))
            out = self._attend_varlen(varlen, li, q, k, v) if varlen is not None else \
                torch.empty(n, nh, hd, dtype=x.dtype, device=x.device)  # the compute dtype
            for lo, hi, unit_past, mask in units:
                qs = q[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, nh, n_u, hd]
                ks = k[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, kvh, n_u, hd]
                vs = v[lo:hi].transpose(0, 1).unsqueeze(0)
                if unit_past is not None:
                    pk, pv = unit_past[li]
                    ks, vs = torch.cat([pk, ks], dim=2), torch.cat([pv, vs], dim=2)  # [1, kvh, P+n_u, hd]
                ks, vs = ks.to(cdt), vs.to(cdt)
                if unit_past is None:
                    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=hi - lo > 1, enable_gqa=gqa)
                else:
                    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
                out[lo:hi] = o[0].transpose(0, 1)
            x.add_(layer.o(out.reshape(n, q_size).to(wdt)))  # in place: a bf16 output is widened in the add
            h = self._rms(x, layer.ln2, wdt)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x.add_(layer.down(F.silu(gate) * up))
        return self._rms(x, self.norm), (kept if keep_kv else None)
