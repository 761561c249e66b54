"""Op-by-op timings of the packed forward's per-token work, eager against the alternatives (issue 14, item 3).

    nice -n 10 python -m bench.per_token_ops [--model 25m] [--dtype bfloat16] [--tokens 2048] [--rounds 15]
                                             [--no-compile]

For one decoder layer of the model's shapes (random weights, W1-like pass: sequences of 300-600 tokens packed
into `--tokens`), each op is timed in its current eager form (service/engine/packed.py) and in each alternative:
torch.compile (inductor, static shapes: the engine would bucket token counts), `F.rms_norm`, in-place forms,
and for attention one masked SDPA call or a padded batch instead of one call per sequence. The machine here is
shared and loaded, so timings are made to be compared, not read absolutely: one thread, every variant of an op
run in turn inside each round (A B C A B C ...), the median of the rounds per variant, and the ratio to eager.
Figures for the record (bench/ANALYSIS.md); never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

MODELS = {  # bench/cli.py's specs (bench.cli imports the server stack; the shapes are all that is needed here)
    "25m": dict(layers=8, hidden=512, heads=8, kv_heads=2, intermediate=1536),
    "100m": dict(layers=12, hidden=768, heads=12, kv_heads=2, intermediate=2816),
}


def w1_lengths(tokens: int, seed: int = 0) -> list[int]:
    """Sequences of 300-600 tokens (W1's trajectories) filling a pass of `tokens`, the last one cut to fit."""
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < tokens:
        n = min(int(torch.randint(300, 601, (1,), generator=gen)), tokens - total)
        lengths.append(n)
        total += n
    return lengths


def time_interleaved(variants: dict, rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each variant, the variants taking turns inside every round."""
    for name, fn in list(variants.items()):  # warm-up (and compile) outside the timed rounds
        try:
            fn()
            fn()
        except Exception as err:  # noqa: BLE001 - a variant that cannot run here is reported and left out
            print(f"# {name}: failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            del variants[name]
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def build_layer(spec: dict, dtype: torch.dtype):
    from model_store.modeling import build_backbone
    from service.engine.packed import PackedQwen2

    torch.manual_seed(0)
    config = dict(model_type="qwen2", vocab_size=1024, hidden_size=spec["hidden"],
                  intermediate_size=spec["intermediate"], num_hidden_layers=1, num_attention_heads=spec["heads"],
                  num_key_value_heads=spec["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=False)
    backbone = build_backbone(config).eval().to(dtype)
    return PackedQwen2(backbone)


def op_variants(model, lengths: list[int], compile_: bool = True, only: set | None = None):
    """(op name, {variant name: zero-argument callable}) for each op selected by `only` (keys a, b, c, c2, d, d2,
    e, f, g), "eager" first: the form packed.py runs."""
    def wanted(key: str) -> bool:
        return only is None or key in only

    layer = model.layers[0]
    n, hidden = sum(lengths), model.embed.shape[1]
    nh, kvh, hd, eps = model.heads, model.kv_heads, model.head_dim, model.eps
    q_size, kv_size = nh * hd, kvh * hd
    wdt, cdt = model.dtype, model.compute_dtype
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, hidden, generator=gen).to(cdt)  # the residual stream
    positions = torch.cat([torch.arange(length) for length in lengths])
    cos, sin = model._cos[positions][:, None, :], model._sin[positions][:, None, :]  # [N, 1, hd]
    h = model._rms(x, layer.ln1, wdt)
    qkv = layer.qkv(h)  # [N, (nh + 2 kvh) hd]
    gate_up = layer.gate_up(h)  # [N, 2 I]
    o_out = layer.o(torch.randn(n, q_size, generator=gen).to(wdt))  # [N, H]
    compile_static = (lambda fn: torch.compile(fn, dynamic=False)) if compile_ else None

    def with_compiled(variants: dict, fn) -> dict:
        if compile_static is not None:
            variants["compiled"] = _bind(compile_static(fn[0]), *fn[1:])
        return variants

    def rms(x, w):
        return model._rms(x, w, wdt)

    def rms_torch(x, w):
        return F.rms_norm(x, (hidden,), w, eps).to(wdt)

    ln1_32, ln2_32 = layer.ln1.float(), layer.ln2.float()  # F.rms_norm's fused kernel wants the input's dtype

    def rope(qkv, cos, sin):
        """packed.py's form: transformers' rotate-half, on q and k separately."""
        q = _rotate_half_form(qkv[:, :q_size].to(cdt).view(n, nh, hd), cos, sin)  # [N, nh, hd]
        k = _rotate_half_form(qkv[:, q_size:q_size + kv_size].to(cdt).view(n, kvh, hd), cos, sin).to(wdt)
        return q, k

    sin_signed = torch.cat([-sin[..., :hd // 2], sin[..., hd // 2:]], dim=-1)  # rotate-half's sign folded in

    def rope_joint(qkv, cos, sin_signed):
        """q and k rotated in one pass over their adjacent columns, rotate-half's sign in the sin table."""
        qk = qkv[:, :q_size + kv_size].to(cdt).view(n, nh + kvh, hd)
        swapped = torch.cat([qk[..., hd // 2:], qk[..., :hd // 2]], dim=-1)
        qk = torch.addcmul(qk * cos, swapped, sin_signed)
        return qk[:, :nh], qk[:, nh:].to(wdt).contiguous()

    def silu_mul(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def silu_mul_inplace(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    residual = x.clone()

    def add_rms(o_out, w):
        residual.add_(o_out)
        return model._rms(residual, w, wdt)

    def add_rms_torch(o_out, w):
        residual.add_(o_out)
        return F.rms_norm(residual, (hidden,), w, eps).to(wdt)

    def layer_without_attention(x, rms_fn=rms, rope_fn=rope, silu_fn=silu_mul):
        """One decoder layer with attention replaced by its input (q): every other op of the packed forward."""
        hs = rms_fn(x, layer.ln1)
        qkv = layer.qkv(hs)
        q, k = rope_fn(qkv, cos, sin)
        x.add_(layer.o(q.reshape(n, q_size).to(wdt)))
        hs = rms_fn(x, layer.ln2)
        x.add_(layer.down(silu_fn(layer.gate_up(hs))))
        return x

    ops = []
    ops.append(("(a) RMSNorm -> proj dtype", with_compiled(
        {"eager": _bind(rms, x, layer.ln1), "F.rms_norm, fp32 weight": _bind(rms_torch, x, ln1_32)},
        (rms, x, layer.ln1))))
    ops.append(("(b) rotary q,k (+casts)", with_compiled(
        {"eager": _bind(rope, qkv, cos, sin), "q|k joint, signed sin": _bind(rope_joint, qkv, cos, sin_signed)},
        (rope, qkv, cos, sin))))
    ops.append(("(c) SiLU-and-mul", with_compiled(
        {"eager": _bind(silu_mul, gate_up), "in-place mul": _bind(silu_mul_inplace, gate_up)}, (silu_mul, gate_up))))
    ops.append(("(d) residual add + RMSNorm", with_compiled(
        {"eager": _bind(add_rms, o_out, layer.ln2), "F.rms_norm, fp32 weight": _bind(add_rms_torch, o_out, ln2_32)},
        (add_rms, o_out, layer.ln2))))
    if layer.gate_up.packed is not None and wanted("c2"):
        ops.append(("(c2) gate|up proj + SiLU-and-mul", fused_mlp_variants(layer, rms(x, layer.ln2))))
    if layer.down.packed is not None and wdt == torch.float32 and wanted("d2"):
        ops.append(("(d2) down proj + residual add", fused_residual_variants(layer, silu_mul(gate_up), x.clone())))
    layer_variants = {"eager": _bind(layer_without_attention, x.clone())}
    if compile_static is not None:
        # the elementwise pieces compiled, the oneDNN projections between them left as they are
        layer_variants["compiled pieces"] = _bind(layer_without_attention, x.clone(), compile_static(rms),
                                                  compile_static(rope), compile_static(silu_mul))
        # the whole layer with plain F.linear weights: inductor's freezing prepacks them for oneDNN itself
        # (our own oneDNN-packed weights do not lower: inductor raises on the opaque mkldnn tensor)
        whole = torch.compile(_PlainLayer(layer, model, cos, sin).eval(), dynamic=False, options={"freezing": True})
        layer_variants["compiled whole (F.linear)"] = _bind(whole, x.clone())
    ops.append(("(e) layer without attention", layer_variants))
    hs = model._rms(x, layer.ln1, wdt)
    mid = torch.randn(n, layer.down.weight.shape[1], generator=gen).to(wdt)
    attn_out = torch.randn(n, q_size, generator=gen).to(wdt)
    ops.append(("(g) the 4 projections (oneDNN)", {"eager": lambda: (layer.qkv(hs), layer.o(attn_out),
                                                                     layer.gate_up(hs), layer.down(mid))}))
    if wanted("f"):  # built only when asked for: it checks every layout against the eager one (seconds)
        ops.append(("(f) attention", attention_variants(model, lengths, qkv, cos, sin, compile_)))
    for op, variants in ops:
        if wanted(op[1:op.index(")")]):
            yield op, variants


def fused_mlp_variants(layer, hs) -> dict:
    """gate|up as one oneDNN matmul then SiLU-and-mul (packed.py), against two oneDNN matmuls whose epilogues
    do the work: gate with a swish post-op, up with a binary multiply by the activated gate."""
    gate_w, up_w = layer.gate_up.weight.chunk(2, dim=0)
    gate_p, up_p = (torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None) for w in (gate_w, up_w))

    def eager():
        gate, up = layer.gate_up(hs).chunk(2, dim=-1)
        return F.silu(gate) * up

    def fused():
        gate = torch.ops.mkldnn._linear_pointwise(hs, gate_p, None, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(hs, gate, up_p, None, "mul")

    return {"eager": eager, "oneDNN post-ops": fused}


def fused_residual_variants(layer, mid, x) -> dict:
    """fp32 only (the residual stays fp32): the down projection then an in-place add, against oneDNN's binary add."""
    down_p = layer.down.packed

    def eager():
        return x.add_(layer.down(mid))

    def fused():
        return torch.ops.mkldnn._linear_pointwise.binary(mid, x, down_p, None, "add")

    return {"eager": eager, "oneDNN binary add": fused}


def attention_variants(model, lengths: list[int], qkv, cos, sin, compile_: bool) -> dict:
    """Causal attention of W1-like packed sequences (no past): SDPA per sequence (packed.py's `units` path) against
    one call over the pass with a block-diagonal mask, a right-padded batch, and bf16 inputs."""
    n = sum(lengths)
    nh, kvh, hd = model.heads, model.kv_heads, model.head_dim
    q_size, kv_size = nh * hd, kvh * hd
    cdt = model.compute_dtype
    q = _rotate_half_form(qkv[:, :q_size].to(cdt).view(n, nh, hd), cos, sin)  # [N, nh, hd]
    k = _rotate_half_form(qkv[:, q_size:q_size + kv_size].to(cdt).view(n, kvh, hd), cos, sin).to(model.dtype)
    v = qkv[:, q_size + kv_size:].view(n, kvh, hd)
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    gqa = nh != kvh

    def per_sequence(dtype=cdt):
        out = torch.empty(n, nh, hd, dtype=cdt)
        for lo, hi in zip(offsets, offsets[1:]):
            qs = q[lo:hi].transpose(0, 1).unsqueeze(0).to(dtype)  # [1, nh, n_s, hd]
            ks = k[lo:hi].transpose(0, 1).unsqueeze(0).to(dtype)
            vs = v[lo:hi].transpose(0, 1).unsqueeze(0).to(dtype)
            out[lo:hi] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1)
        return out

    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(length) for length in lengths])
    block_causal = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])  # [N, N]

    def one_masked_call():
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0).to(cdt),
                                             v.transpose(0, 1).unsqueeze(0).to(cdt), attn_mask=block_causal,
                                             enable_gqa=gqa)
        return out[0].transpose(0, 1)

    longest = max(lengths)

    def padded_batch():
        # right padding: with a causal mask no real query ever sees a pad key, so is_causal alone is exact
        qp = torch.zeros(len(lengths), nh, longest, hd, dtype=cdt)
        kp = torch.zeros(len(lengths), kvh, longest, hd, dtype=cdt)
        vp = torch.zeros(len(lengths), kvh, longest, hd, dtype=cdt)
        for b, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
            qp[b, :, :hi - lo] = q[lo:hi].transpose(0, 1)
            kp[b, :, :hi - lo] = k[lo:hi].transpose(0, 1)
            vp[b, :, :hi - lo] = v[lo:hi].transpose(0, 1)
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa)  # [B, nh, T, hd]
        out = torch.empty(n, nh, hd, dtype=cdt)
        for b, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
            out[lo:hi] = op[b, :, :hi - lo].transpose(0, 1)
        return out

    reference = per_sequence()
    variants = {"eager": per_sequence, "per sequence, bf16": _bind(per_sequence, torch.bfloat16),
                "one call, block mask": one_masked_call, "padded batch, causal": padded_batch}
    if compile_:
        flex = _flex_variant(q, k.to(cdt), v.to(cdt), seq, pos, gqa)
        if flex is not None:
            variants["flex_attention (compiled)"] = flex
    for name, fn in variants.items():  # every variant computes the same attention
        err = (fn().float() - reference).abs().max().item()
        if err > 5e-2:
            raise AssertionError(f"attention variant {name!r} differs from per-sequence SDPA by {err}")
    return variants


def _flex_variant(q, k, v, seq, pos, gqa):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def document_causal(b, h, qi, ki):
        return (seq[qi] == seq[ki]) & (pos[qi] >= pos[ki])

    n = q.shape[0]
    mask = create_block_mask(document_causal, None, None, n, n, device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))

    def run():
        return flex(query, key, value, block_mask=mask, enable_gqa=gqa)[0].transpose(0, 1)

    try:
        run()
    except Exception as err:  # noqa: BLE001 - a CPU build without flex's CPU template: report, go on
        print(f"# flex_attention did not compile on this CPU: {type(err).__name__}: {str(err)[:200]}")
        return None
    return run


class _PlainLayer(torch.nn.Module):
    """The layer without attention as a module of plain weights, for torch.compile(freezing=True)."""

    def __init__(self, layer, model, cos, sin):
        super().__init__()
        as_param = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.qkv_w, self.qkv_b = as_param(layer.qkv.weight), as_param(layer.qkv.bias)
        self.o_w, self.gate_up_w, self.down_w = (as_param(lin.weight) for lin in (layer.o, layer.gate_up, layer.down))
        self.ln1, self.ln2 = as_param(layer.ln1), as_param(layer.ln2)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.model = model

    def forward(self, x):
        m = self.model
        n, q_size, kv_size = x.shape[0], m.heads * m.head_dim, m.kv_heads * m.head_dim
        qkv = F.linear(m._rms(x, self.ln1, m.dtype), self.qkv_w, self.qkv_b)
        q = _rotate_half_form(qkv[:, :q_size].to(m.compute_dtype).view(n, m.heads, m.head_dim), self.cos, self.sin)
        x.add_(F.linear(q.reshape(n, q_size).to(m.dtype), self.o_w))
        gate, up = F.linear(m._rms(x, self.ln2, m.dtype), self.gate_up_w).chunk(2, dim=-1)
        x.add_(F.linear(F.silu(gate) * up, self.down_w))
        return x


def _rotate_half_form(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _bind(fn, *args):
    return lambda: fn(*args)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="25m", choices=sorted(MODELS))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per pass (the CPU default --max-forward-tokens)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--inner", type=int, default=3, help="calls per variant per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--only", default=None, help="comma-separated op keys: a,b,c,c2,d,d2,e,f,g [all]")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_layer(MODELS[args.model], dtype)
    lengths = w1_lengths(args.tokens)
    load = os.getloadavg()[0]
    print(f"# {args.model} {args.dtype}, {args.tokens} tokens as {len(lengths)} sequences {lengths}, "
          f"{args.threads} thread(s), {args.rounds} rounds x {args.inner}, torch {torch.__version__}, "
          f"load {load:.1f} at start")
    print(f"{'op':<34} {'variant':<26} {'median ms':>10} {'vs eager':>9}")
    only = set(args.only.split(",")) if args.only else None
    with torch.inference_mode():
        for op, variants in op_variants(model, lengths, compile_=not args.no_compile, only=only):
            start = time.perf_counter()
            times = time_interleaved(variants, args.rounds, args.inner)
            eager = times["eager"]
            for name, seconds in times.items():
                print(f"{op:<34} {name:<26} {seconds * 1e3:>10.3f} {eager / seconds:>8.2f}x", flush=True)
            print(f"#   ({time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
