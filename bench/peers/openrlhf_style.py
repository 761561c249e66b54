"""An OpenRLHF-style remote reward server (the peer "openrlhf" of the benchmark), on our checkpoint's weights.

Modelled on how OpenRLHF's remote reward server (`openrlhf.cli.serve_rm`) works, written here from scratch:
- one FastAPI app, one `async def` POST handler that runs the model *inside* the handler (so the event loop
  is blocked while it runs: requests are served one at a time, never batched across requests);
- the request's sequences are cut into fixed micro-batches of `--batch-size` (OpenRLHF's `--batch_size`,
  16 in its example script), each LEFT-padded to its longest sequence with an attention mask and
  position ids = cumsum(mask) - 1 (OpenRLHF's reward-model forward);
- the model is the Hugging Face `Qwen2Model` loaded with `from_pretrained` from the checkpoint's
  `backbone/` (safetensors, verified sha256, no remote code) plus our linear value head and a sigmoid,
  applied to EVERY token's hidden state (as OpenRLHF's value head is), then read at the readouts;
- no prefix reuse of any kind, no KV cache.

Differences from OpenRLHF, for a same-input comparison: the body carries token ids (`query_ids`), not text,
so every system scores the very same ids; the response gives the promise at every readout of each
sequence (the state_end and action_end marker positions, docs/ARCHITECTURE.md "Rendering"), i.e. per-step process rewards.

    POST /get_reward {"query_ids": [[int, ...], ...]}
      -> {"rewards": [[V_0, Q_0, Q_1, ...], ...], "usage": {"prompt_tokens", "padded_tokens"}}
    GET /health -> {"status": "ok"}

Run: `python -m bench.peers.openrlhf_style --checkpoint DIR --port N [--batch-size 16]` (binds 127.0.0.1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class RewardModelProxy:
    def __init__(self, checkpoint: Path | str, batch_size: int = 16, threads: int | None = None):
        from safetensors.torch import load_file
        from transformers import Qwen2Model

        from model_store.store import verify_checkpoint

        checkpoint = Path(checkpoint)
        manifest = verify_checkpoint(checkpoint)
        if threads:
            torch.set_num_threads(threads)
        self.backbone = Qwen2Model.from_pretrained(str(checkpoint / "backbone"), dtype=torch.float32,
                                                   attn_implementation="sdpa", local_files_only=True,
                                                   use_safetensors=True).eval()
        head = load_file(str(checkpoint / "value_head.safetensors"))
        hidden = self.backbone.config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        self.value_head.load_state_dict({"weight": head["weight"].float(), "bias": head["bias"].float()})
        self.value_head.eval()
        self.sigmoid = manifest.value_head.activation == "sigmoid"
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer" / "tokenizer.json"))
        self.markers = torch.tensor([tokenizer.token_to_id(manifest.template.state_end),
                                     tokenizer.token_to_id(manifest.template.action_end)])
        self.pad_id = int(self.backbone.config.pad_token_id or 0)
        self.batch_size = batch_size
        self.max_len = manifest.max_seq_len

    @torch.inference_mode()
    def get_reward(self, queries: list[list[int]]) -> tuple[list[list[float]], int]:
        """Promises at the readouts of each query, in fixed micro-batches; also the padded token count."""
        scores: list[list[float]] = []
        padded = 0
        for start in range(0, len(queries), self.batch_size):
            batch = [q[: self.max_len] for q in queries[start:start + self.batch_size]]
            length = max(len(q) for q in batch)
            ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)  # [B, T], left padded
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for b, q in enumerate(batch):
                ids[b, length - len(q):] = torch.tensor(q, dtype=torch.long)
                mask[b, length - len(q):] = 1
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state  # [B, T, H]
            values = self.value_head(hidden).squeeze(-1)  # [B, T]: the head runs on every token
            if self.sigmoid:
                values = torch.sigmoid(values)
            readout = torch.isin(ids, self.markers) & (mask == 1)
            for b in range(len(batch)):
                scores.append(values[b][readout[b]].tolist())
            padded += ids.numel()
        return scores, padded


def create_app(proxy: RewardModelProxy) -> FastAPI:
    app = FastAPI(title="OpenRLHF-style reward server (bench peer)")

    @app.post("/get_reward")
    async def get_reward(request: Request):
        data = await request.json()
        queries = data.get("query_ids")
        if not isinstance(queries, list) or not queries:
            return JSONResponse({"error": "query_ids must be a non-empty list of token-id lists"}, status_code=422)
        rewards, padded = proxy.get_reward(queries)  # blocks the event loop, as OpenRLHF's handler does
        return JSONResponse({"rewards": rewards, "usage": {"prompt_tokens": sum(len(q) for q in queries),
                                                           "padded_tokens": padded}})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="OpenRLHF-style reward server (benchmark peer)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    proxy = RewardModelProxy(args.checkpoint, batch_size=args.batch_size, threads=args.threads)
    uvicorn.run(create_app(proxy), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
