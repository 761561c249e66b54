"""PRMEngine: the torch implementation of EngineClient.

Request -> render (segment-wise, template from the manifest) -> ScoreJobs (ids + readout positions) ->
scheduler (dynamic batches, worker thread) -> runner -> promises -> post-processing. One forward pass per
trajectory scores every step. Validation errors are `InvalidInput` naming the offending item.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model_store.modeling import LoadedPRM, load_prm, load_tokenizer, pick_device
from model_store.precision import DtypeChoice, resolve_dtype
from model_store.render import make_renderer
from model_store.store import verify_checkpoint
from service.engine import device_setup, postprocess
from service.engine.client import EngineClient
from service.engine.config import EngineConfig
from service.engine.cuda_graphs import GraphRunner, serving_buckets
from service.engine.errors import InvalidInput, UnknownModel
from service.engine.prefix_cache import PrefixCache
from service.engine.runner import TorchRunner
from service.engine.scheduler import Scheduler
from service.engine.types import (AGGREGATES, DEFAULT_AGGREGATE, DEFAULT_MODEL_ALIAS, BatchResults, Beam,
                                  ExpandOutput, Health, JobResult, ModelInfo, RankedCandidate, RerankOutput, ScoreJob,
                                  ScoreOutput, Selection, Step, Trajectory, TrajectoryScore, Usage)
from service.metrics import Metrics

log = logging.getLogger("agentprm.engine")


def common_prefix_len(sequences: list[tuple[int, ...]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token of its own."""
    if len(sequences) < 2:
        return 0
    first, limit = sequences[0], min(len(s) for s in sequences) - 1
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


class PRMEngine(EngineClient):
    def __init__(self, loaded: LoadedPRM, config: EngineConfig = EngineConfig(), metrics: Metrics | None = None,
                 device: torch.device | None = None, runner=None, dtype: DtypeChoice | None = None):
        """`runner` (anything with `run_batch(jobs) -> BatchResults`): the vllm backend's VllmRunner, which needs
        no torch model (`loaded.model` is None then); None builds the TorchRunner on `loaded.model`."""
        self.loaded = loaded
        self.config = config
        self.metrics = metrics or Metrics()
        self.manifest = loaded.manifest
        self.device = device or next(loaded.model.parameters()).device
        if dtype is None and loaded.model is not None:
            dtype = DtypeChoice(str(next(loaded.model.backbone.parameters()).dtype).removeprefix("torch."), "as loaded")
        self.dtype = dtype or DtypeChoice("float32", "default")
        self.renderer = make_renderer(loaded.tokenizer, loaded.manifest.template)
        self.kernel = None
        self.runner = runner if runner is not None else self._torch_runner(loaded, config)
        # Sized once the model, the graphs and the backend hold their memory (auto on a GPU reads what is left);
        # vLLM keeps its own prefix cache, ours holds nothing then.
        cache_bytes = 0 if runner is not None else device_setup.prefix_cache_bytes(config.prefix_cache_bytes,
                                                                                    self.device)
        self.cache = PrefixCache(cache_bytes, config.prefix_block_size)
        if runner is None:
            self.runner.cache = self.cache
        self.scheduler = Scheduler(self.runner.run_batch, config.scheduler_config(), on_batch=self._record_batch)
        self.metrics.queue_depth.set_function(lambda: self.scheduler.queue_depth)
        self.metrics.queue_tokens.set_function(lambda: self.scheduler.queued_tokens)
        self.metrics.cache_bytes.set_function(lambda: self.cache.bytes)
        self.metrics.cache_blocks.set_function(lambda: len(self.cache))
        m = self.manifest
        # A vLLM engine may be configured for shorter sequences than the checkpoint takes (--vllm-max-model-len).
        self.max_seq_len = min(m.max_seq_len, getattr(self.runner, "max_model_len", m.max_seq_len))
        self.info = ModelInfo(ref=m.ref, name=m.name, version=m.version, max_seq_len=self.max_seq_len,
                              aliases=(DEFAULT_MODEL_ALIAS,), method=m.training.method, created_at=m.created_at,
                              head_kind=m.value_head.kind, template_kind=m.template.kind,
                              template_family=m.template.family, data_sha256=m.training.data.get("sha256"),
                              source=m.training.data.get("source"), dtype=self.dtype.name)
        self.metrics.model_dtype.labels(dtype=self.dtype.name).set(1)

    def _torch_runner(self, loaded: LoadedPRM, config: EngineConfig) -> TorchRunner:
        pad_id = loaded.model.backbone.config.pad_token_id or 0
        self.kernel = device_setup.prepare_kernels(loaded.model, self.device)  # Triton probed, warmed, or off
        graphs = None
        if config.cuda_graphs and self.device.type == "cuda":
            graphs = GraphRunner(loaded.model, serving_buckets(), self.device, pad_id=pad_id, with_kv=True)
            if not graphs.enabled:
                log.warning("CUDA graphs off: %s", graphs.disabled_reason)
        return TorchRunner(loaded.model, self.device, pad_id=pad_id,
                           max_forward_tokens=config.forward_tokens(self.device.type),
                           marker_ids=self.renderer.readout_token_ids,
                           backend=config.backend, graphs=graphs)

    @classmethod
    def from_checkpoint(cls, path: Path | str, config: EngineConfig = EngineConfig(),
                        metrics: Metrics | None = None) -> "PRMEngine":
        """The engine of a checkpoint: its torch model, or with `backend="vllm"` a vLLM server started on its
        verified export (vLLM's reason in one line, VllmStartError, when that fails; nothing left running)."""
        device = pick_device(config.device)
        if config.backend == "vllm":
            from service.engine.backends.vllm import VllmRunner

            path = Path(path)
            manifest = verify_checkpoint(path)
            loaded = LoadedPRM(manifest=manifest, model=None, tokenizer=load_tokenizer(path, manifest), path=path)
            name = config.vllm.dtype if config.vllm.dtype != "auto" else ("float32" if device.type == "cpu" else "bfloat16")
            return cls(loaded, config, metrics, device, runner=VllmRunner.start(path, config.vllm, device.type),
                       dtype=DtypeChoice(name, f"--vllm-dtype {config.vllm.dtype}"))
        # Served in config.dtype (model_store.precision.resolve_dtype): the backbone is cast to the chosen dtype,
        # the value head stays fp32 (read in fp32, never rounded).
        loaded = load_prm(path, device=device, dtype=torch.float32)
        choice = resolve_dtype(config.dtype, device, hint=loaded.manifest.dtype)
        loaded.model.backbone.to(dtype=choice.torch_dtype)
        log.debug("dtype %s (%s); value head float32", choice.name, choice.reason)  # the start line says it
        return cls(loaded, config, metrics, device, dtype=choice)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self.scheduler.start()

    async def shutdown(self) -> None:
        await self.scheduler.stop()
        self.close()

    def close(self) -> None:
        """Release what lives outside this process (the vllm backend's server). Idempotent; shutdown calls it."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    async def check_health(self) -> Health:
        alive = self.scheduler.alive
        if alive and hasattr(self.runner, "alive") and not self.runner.alive():
            return Health(live=False, ready=False, detail=self.runner.failure())  # vLLM's process has exited
        return Health(live=alive, ready=alive, detail="ok" if alive else (self.scheduler.failure or "engine not running"))

    def saturated(self) -> float | None:
        return self.scheduler.saturated()

    def models(self) -> list[ModelInfo]:
        return [self.info]

    # -- helpers ---------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> str:
        if model in (None, "", DEFAULT_MODEL_ALIAS, self.info.name, self.info.ref, *self.info.aliases):
            return self.info.ref
        also = ", ".join(repr(a) for a in dict.fromkeys((DEFAULT_MODEL_ALIAS, *self.info.aliases)))
        raise UnknownModel(f"model {model!r} is not served here; available: {self.info.ref} (also as {also})")

    def _check_length(self, ids, what: str) -> None:
        limit = self.max_seq_len
        if len(ids) > limit:
            raise InvalidInput(f"{what} is {len(ids)} tokens long; this model accepts at most {limit}")

    def _record_batch(self, results: BatchResults, seconds: float) -> None:
        stats = results.stats  # the runner's numbers for this very batch, handed back with its results
        m = self.metrics
        m.batch_size.observe(stats.jobs)
        m.batch_tokens.observe(stats.padded_tokens)
        m.batch_duration.observe(seconds)
        m.tokens_computed.inc(stats.computed_tokens)
        m.tokens_cached.inc(stats.tokens - stats.computed_tokens)
        m.cache_hits.inc(stats.cache_hits)
        m.cache_misses.inc(stats.cache_misses)
        m.cache_evictions.inc(stats.cache_evictions)

    def _usage(self, jobs: list[ScoreJob], results: list[JobResult]) -> Usage:
        tokens = sum(len(j.ids) for j in jobs)
        computed = sum(r.computed_tokens for r in results)
        self.metrics.prompt_tokens.inc(tokens)
        return Usage(prompt_tokens=tokens, computed_tokens=computed, cached_tokens=tokens - computed)

    def _share(self, jobs: list[ScoreJob]) -> list[ScoreJob]:
        """Mark the request's common prefix so the runner computes it once."""
        if not self.config.share_prefixes:
            return jobs
        shared = common_prefix_len([j.ids for j in jobs])
        if shared < self.config.prefix_block_size // 2:
            return jobs  # too short to be worth a separate pass
        return [ScoreJob(j.ids, j.readouts, shared) for j in jobs]

    async def _run(self, jobs: list[ScoreJob], request_id: str) -> list[JobResult]:
        return await self.scheduler.submit(jobs, tag=request_id)

    def _trajectory_job(self, trajectory: Trajectory, what: str) -> ScoreJob:
        if not trajectory.steps:
            raise InvalidInput(f"{what} has no steps")
        rendered = self.renderer.render(trajectory)
        self._check_length(rendered.ids, what)
        return ScoreJob(rendered.ids, rendered.readouts)

    def _trajectory_scores(self, results: list[JobResult], aggregate: str) -> list[TrajectoryScore]:
        outputs = [r.promises for r in results]
        scored = []
        for out in outputs:
            initial, promises = float(out[0]), [float(x) for x in out[1:]]
            scored.append(TrajectoryScore(score=postprocess.aggregate(promises, aggregate), initial_value=initial,
                                          steps=postprocess.step_scores(promises, initial)))
        self.metrics.steps_scored.inc(sum(len(o) - 1 for o in outputs))
        return scored

    def _check_scoring(self, model: str, aggregate: str, items: list, what: str, limit: int, too_many: str) -> str:
        """The served model's ref, after the checks /v1/score and /v1/rerank share (`too_many`: the message
        when more than `limit` items came)."""
        ref = self._check_model(model)
        if aggregate not in AGGREGATES:
            raise InvalidInput(f"unknown aggregate {aggregate!r}; expected one of {', '.join(AGGREGATES)}")
        if not items:
            raise InvalidInput(f"{what} is empty")
        if len(items) > limit:
            raise InvalidInput(too_many)
        return ref

    # -- routes ----------------------------------------------------------------------------------
    async def score(self, model: str, trajectories: list[Trajectory], aggregate: str = DEFAULT_AGGREGATE,
                    request_id: str = "") -> ScoreOutput:
        limit = self.config.max_trajectories
        ref = self._check_scoring(model, aggregate, trajectories, "trajectories", limit,
                                  f"{len(trajectories)} trajectories in one request; the limit is {limit}")
        jobs = self._share([self._trajectory_job(t, f"trajectories[{i}]") for i, t in enumerate(trajectories)])
        results = await self._run(jobs, request_id)
        return ScoreOutput(ref, tuple(self._trajectory_scores(results, aggregate)), self._usage(jobs, results))

    async def rerank(self, model: str, task: str, candidates: list[tuple[Step, ...]],
                     aggregate: str = DEFAULT_AGGREGATE, top_n: int | None = None,
                     request_id: str = "") -> RerankOutput:
        limit = self.config.max_candidates
        ref = self._check_scoring(model, aggregate, candidates, "candidates", limit,
                                  f"{len(candidates)} candidates; the limit is {limit}")
        if top_n is not None and top_n < 1:
            raise InvalidInput("top_n must be at least 1")
        jobs = self._share([self._trajectory_job(Trajectory(task, tuple(steps)), f"candidates[{i}]")
                            for i, steps in enumerate(candidates)])
        outputs = await self._run(jobs, request_id)
        scored = self._trajectory_scores(outputs, aggregate)
        order = postprocess.rank([s.score for s in scored], top_n)
        results = tuple(RankedCandidate(**vars(scored[i]), index=i) for i in order)
        return RerankOutput(ref, results, self._usage(jobs, outputs))

    async def expand(self, model: str, beams: list[Beam], beam_width: int, request_id: str = "") -> ExpandOutput:
        ref = self._check_model(model)
        if not beams:
            raise InvalidInput("beams is empty")
        if beam_width < 1:
            raise InvalidInput("beam_width must be at least 1")
        total = sum(len(b.candidates) for b in beams)
        if total > self.config.max_candidates:
            raise InvalidInput(f"{total} candidates across beams; the limit is {self.config.max_candidates}")
        jobs: list[ScoreJob] = []
        for b, beam in enumerate(beams):
            if not beam.candidates:
                raise InvalidInput(f"beams[{b}].candidates is empty")
            base = self.renderer.render_steps(beam.trajectory.task, beam.trajectory.steps, beam.observation)
            baseline = base.step_readouts[-1] if base.step_readouts else base.state_readout
            for c, action in enumerate(beam.candidates):
                ids = self.renderer.append_action(base, action)
                self._check_length(ids, f"beams[{b}] with candidates[{c}]")
                shared = len(base.ids) if self.config.share_prefixes else 0  # the beam's history + observation
                jobs.append(ScoreJob(ids, (baseline, len(ids) - 1), shared))
        results = await self._run(jobs, request_id)
        outputs = iter(r.promises for r in results)
        per_beam = []
        flat: list[Selection] = []
        for b, beam in enumerate(beams):
            scores = []
            for c in range(len(beam.candidates)):
                before, promise = (float(x) for x in next(outputs))
                step = postprocess.step_scores([promise], before)[0]
                scores.append(step)
                flat.append(Selection(beam=b, candidate=c, promise=step.promise, progress=step.progress))
            per_beam.append(tuple(scores))
        self.metrics.steps_scored.inc(len(jobs))
        order = postprocess.rank([s.promise for s in flat], beam_width)
        return ExpandOutput(ref, tuple(per_beam), tuple(flat[i] for i in order), self._usage(jobs, results))
