"""One shared past for the transformers (padded) forward: B sequences continue the same KV without B copies of it.

transformers attends a past through its cache: `DynamicCache.update` concatenates each layer's past keys with the
new ones, so B candidates on a P-token history hold B x P keys per layer, all layers at once (a 16k-token history
under 400 short candidates of a 0.5B model: ~80 GB). Here the past is attended once instead, with the packed
backend's one-call attention (service.engine.packed.attend_varlen): queries [B*T], keys [P + B*T] (the past once,
then every row's new tokens), a mask that lets a row see the whole past and its own earlier tokens. Pad tokens on
the right of a row only see what real tokens see before them and are never read, as in the padded forward.

How it plugs into transformers, without touching the model's code:
- `ATTENTION` is an attention implementation registered with transformers' AttentionInterface (the backbone is
  switched to it once, `use_for`). Outside `attending_one_past` it is transformers' SDPA, unchanged (the same
  function, the same mask function), so every other pass, graphed or not, computes exactly what it did.
- `SharedPastCache` hands transformers the past length (positions start at P) and, from `update`, only the
  new tokens' keys; inside `attending_one_past` the attention reads the past from it, by layer.
A model qualifies (`supports`) when every layer is plain full attention (no sliding window, no logit
softcapping): what the one-call mask states. Others keep transformers' cache (B copies, budgeted as such).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from service.engine.packed import KV, _Varlen, attend_varlen, varlen_layout

ATTENTION = "agentprm_sdpa"  # SDPA, but a pass inside attending_one_past attends its shared past once

_PASS: contextvars.ContextVar["_OnePast | None"] = contextvars.ContextVar("agentprm_one_past", default=None)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        one_past = _PASS.get()
        if one_past is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return one_past.attend(module.layer_idx, query, key, value, scaling, kwargs), None

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


_register()


def supports(backbone) -> bool:
    """Whether one-past attention computes this backbone's attention: plain causal full attention in every layer,
    through transformers' AttentionInterface (set_attn_implementation), in SDPA now."""
    config = getattr(backbone, "config", None)
    types = getattr(config, "layer_types", None)
    if not types and getattr(config, "sliding_window", None) is None:
        types = ["full_attention"]  # a family without layer types or a window (Llama): full attention everywhere
    return (config is not None and bool(types) and all(t == "full_attention" for t in types)
            and getattr(config, "_attn_implementation", None) in ("sdpa", ATTENTION)
            and getattr(config, "attn_logit_softcapping", None) is None and getattr(config, "is_causal", True)
            and hasattr(backbone, "set_attn_implementation") and backbone._can_set_attn_implementation())


def use_for(backbone) -> None:
    """Switch the backbone to ATTENTION (SDPA outside attending_one_past; idempotent)."""
    if backbone.config._attn_implementation != ATTENTION:
        backbone.set_attn_implementation(ATTENTION)


class _OnePastLayer(DynamicLayer):
    """A layer of SharedPastCache: reports P + what it was given, keeps and returns only the new tokens' KV."""

    def __init__(self, past_len: int):
        super().__init__()
        self.past_len = past_len

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = key_states, value_states  # [B, kvh, T, hd]
        self.is_initialized = True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.past_len + (self.keys.shape[-2] if self.is_initialized else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The keys `update` returns are the new tokens' only: transformers' own mask (plain causal over them, which
        # SDPA skips) is never used inside attending_one_past; the one-call mask covers the past.
        return query_length, 0


class SharedPastCache(DynamicCache):
    """The cache of one pass whose B rows all continue `past` ([1, kvh, P, hd] per layer). After the pass,
    `layers[i].keys/values` hold the new tokens' KV, [B, kvh, T, hd] (the past is not in them)."""

    def __init__(self, past: KV):
        super().__init__()
        self.past = past
        self.layers = [_OnePastLayer(past[0][0].shape[2]) for _ in past]


@dataclass
class _OnePast:
    cache: SharedPastCache
    layout: _Varlen | None = None  # one per pass: its dense mask is made at the first layer, reused by the rest

    def attend(self, layer: int, query, key, value, scaling, extra: dict) -> torch.Tensor:
        """query [B, nh, T, hd], key/value [B, kvh, T, hd] (new tokens) -> [B, T, nh, hd], transformers' layout."""
        if extra.get("sliding_window") is not None or extra.get("softcap") is not None or "s_aux" in extra:
            raise RuntimeError("one-past attention computes plain full attention only (see shared_past.supports)")
        b, nh, t, hd = query.shape
        if self.layout is None:
            self.layout = varlen_layout([t] * b, [self.cache.past] * b, query.device)
        flat = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], hd)  # [B, h, T, hd] -> [B*T, h, hd]
        out = attend_varlen(self.layout, layer, flat(query), flat(key), flat(value), scale=scaling)  # [B*T, nh, hd]
        return out.view(b, t, nh, hd)


@contextlib.contextmanager
def attending_one_past(cache: SharedPastCache):
    """Inside: the backbone's attention (switched by use_for) attends `cache.past` once, for every row of the pass."""
    token = _PASS.set(_OnePast(cache))
    try:
        yield
    finally:
        _PASS.reset(token)
