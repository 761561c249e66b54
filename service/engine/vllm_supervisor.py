"""The managed vLLM server's parent: it dies with us, whatever way we die.

    python -P vllm_supervisor.py GRACE_S [--remove DIR] -- VLLM_COMMAND...

Started by service.engine.vllm_server.VllmProcess as the leader of a new process group, with a pipe from our
server on its stdin. It starts vLLM as its child (same group) and exits with vLLM's exit code. When the pipe
reaches end-of-file -- our server exited, was killed (SIGKILL included) or closed it -- it sends SIGTERM to the
group, and SIGKILL after GRACE_S seconds; with --remove it then deletes DIR (the export and socket folder our
server would have removed at its shutdown).

Why not vLLM's own SIGTERM handling (PR_SET_PDEATHSIG): vLLM's API server handles SIGTERM only once its
engine has started, which takes minutes (torch.compile warm-up), and its engine-core process does not watch
its parent. A server killed during vLLM's start-up would leave vLLM computing until its start finished.

It ignores SIGTERM, SIGINT and SIGHUP itself, so a SIGTERM to the group (VllmProcess.stop) lets vLLM shut
down in its own time while the supervisor waits for it and reports its exit code; SIGKILL ends it.
Standard library only, run with -P (this folder holds a `types.py` that would hide the standard module).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(child: subprocess.Popen, grace_s: float, remove: str | None = None) -> None:
    """SIGTERM to our process group (vLLM and its workers; we ignore it), `remove` deleted once vLLM has exited
    or grace_s has passed, then SIGKILL to the group (this process too): nothing of the group survives."""
    pgid = os.getpgid(0)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
    if remove:
        shutil.rmtree(remove, ignore_errors=True)
    os.killpg(pgid, signal.SIGKILL)


def _default_signals() -> None:
    """In vLLM's process before exec: the default handlers back (an ignored signal stays ignored across exec)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def main(argv: list[str]) -> int:
    remove = None
    if len(argv) > 2 and argv[1] == "--remove":
        remove, argv = argv[2], argv[:1] + argv[3:]
    if len(argv) < 3 or argv[1] != "--":
        print("usage: vllm_supervisor.py GRACE_S [--remove DIR] -- COMMAND...", file=sys.stderr)
        return 2
    grace_s, command = float(argv[0]), argv[2:]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, preexec_fn=_default_signals)

    def watch_parent() -> None:
        try:  # os.read, not sys.stdin: a buffered reader in a daemon thread can abort the interpreter at exit
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        if child.poll() is None:  # end-of-file: our server is gone, so is the reason to run vLLM
            stop_group(child, grace_s, remove)

    threading.Thread(target=watch_parent, daemon=True).start()
    code = child.wait()
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))  # no interpreter shutdown while the watching thread blocks on the pipe
