"""Offline vLLM scoring worker: run with the `.venv-vllm` python, never imported by the project.

Contract: `python bench/vllm_worker.py --model EXPORT_DIR --pooling step|all|last --input IN.json --output OUT.json
[--repeat N] [--dtype float32|bfloat16] [--eager]`. "last": `PoolerConfig(pooling_type="LAST")`, pooling task "classify"
(one row per prompt), prefix caching on (vLLM's default for it). IN.json is {"ids": [[int, ...], ...]} (token ids exactly as our renderer produced them).
The worker builds `vllm.LLM(model=EXPORT_DIR, runner="pooling", dtype="float32", pooler_config=...)`
with `PoolerConfig(pooling_type="STEP", step_tag_id=<|end|> id, use_activation=True)` for "step" and
`PoolerConfig(pooling_type="ALL", use_activation=True)` for "all" (Qwen2ForRewardModel would default to
raw logits), then calls `LLM.encode([TokensPrompt(prompt_token_ids=ids) ...], pooling_task=
"token_classify")` `repeat` times (one batch of all prompts per call). OUT.json: {"vllm_version",
"start_s" (engine construction), "runs": [{"seconds", "prompts", "tokens"}], "outputs": [[float, ...] per
prompt]}, where each output is the promise column
(the last label) of vLLM's pooled rows: one row per <|end|> token with "step", one per token with "all".
Selecting the readout positions from "all" rows is the caller's job (bench.vllm_peer.select_readouts).
vLLM's activation is on unless the export says its head has none (`activation: false` in agentprm_vllm.json: an
identity head's raw value). `--eager` skips vLLM's torch.compile and graph warm-up (minutes on a busy CPU): for
numerical checks, not for timing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by bench.vllm_peer.export_for_vllm")
    parser.add_argument("--pooling", choices=("step", "all", "last"), default="step")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="enforce_eager: no torch.compile (checks, not timing)")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 100:
        parser.error("--repeat must be in [1, 100]")

    import vllm
    from vllm import LLM
    from vllm.config import PoolerConfig
    from vllm.inputs import TokensPrompt

    meta = json.loads((Path(args.model) / "agentprm_vllm.json").read_text())
    ids = json.loads(Path(args.input).read_text())["ids"]
    task = "classify" if args.pooling == "last" else "token_classify"
    activation = bool(meta.get("activation", True))
    if args.pooling == "last":
        pooler_config = PoolerConfig(pooling_type="LAST", use_activation=activation)
    elif args.pooling == "step":
        pooler_config = PoolerConfig(pooling_type="STEP", step_tag_id=meta["end_id"], use_activation=activation)
    else:
        pooler_config = PoolerConfig(pooling_type="ALL", use_activation=activation)
    t0 = time.perf_counter()
    llm = LLM(model=args.model, runner="pooling", dtype=args.dtype, max_model_len=meta["max_seq_len"],
              pooler_config=pooler_config, seed=0, enforce_eager=args.eager)
    start_s = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=list(map(int, x))) for x in ids]
    runs, outputs = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        results = llm.encode(prompts, pooling_task=task, use_tqdm=False)
        runs.append({"seconds": time.perf_counter() - t, "prompts": len(prompts),
                     "tokens": sum(len(x) for x in ids)})
        outputs = [r.outputs.data.float().reshape(r.outputs.data.shape[0], -1)[:, -1].tolist() for r in results]
    Path(args.output).write_text(json.dumps({"vllm_version": vllm.__version__, "start_s": start_s,
                                             "runs": runs, "outputs": outputs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
