"""Every server setting refuses a bad value the same way, through the real `agentprm` command: exit code 2
and one line on stderr that names the flag or environment variable, never a traceback.

The bad values are generated from ServerSettings itself (numeric bounds, Literal choices, booleans, minimum
lengths), so a setting added later is covered without touching this file. Only free-form text settings,
whose rules live in validators, need an entry in TEXT_INVALID; the test fails naming any setting that has
neither. Every other value is passed as a flag, the rest as environment variables, to `serve
--check-config` (which validates everything, the checkpoint's checksums included, without loading the
model), from a working directory outside the repository. The ~30 processes run four at a time (about
0.35 s of CPU each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, get_origin

import pytest
import torch

from service.settings import ServerSettings

# Settings whose rules a validator enforces (not visible in the field's metadata): one bad value each.
TEXT_INVALID = {
    "store": lambda tmp: str(tmp / "no-such-store"),
    "host": lambda tmp: "not a host",
    "device": lambda tmp: "tpu",
    "api_key": lambda tmp: "key with spaces",
    "api_key_file": lambda tmp: str(tmp / "no-such-keys.txt"),
    "vllm_python": lambda tmp: str(tmp / "no-such-python"),
    "vllm_extra_args": lambda tmp: "--unclosed 'quote",
    "prefix_cache_bytes": lambda tmp: "-1",  # a number of bytes or auto
}


def agentprm_command() -> list[str]:
    script = Path(sys.executable).with_name("agentprm")  # the console script a user runs
    return [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]


def invalid_value(name: str, field, tmp: Path) -> str | None:
    """A value just outside the setting's bounds, derived from its declaration (None: cannot derive one)."""
    if name in TEXT_INVALID:
        return TEXT_INVALID[name](tmp)
    for bound in field.metadata:
        if getattr(bound, "ge", None) is not None:
            return str(bound.ge - 1)
        if getattr(bound, "gt", None) is not None:
            return str(bound.gt)
        if getattr(bound, "le", None) is not None:
            return str(bound.le + 1)
        if getattr(bound, "lt", None) is not None:
            return str(bound.lt)
        if getattr(bound, "min_length", None):
            return ""
    if get_origin(field.annotation) is Literal:
        return "not-a-choice"
    if field.annotation is bool:
        return "maybe"
    if field.annotation in (int, float):
        return "abc"
    return None


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPRM_")}
    return {**env, **extra}


def run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*agentprm_command(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_setting_refuses_a_bad_value_with_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    fields = ServerSettings.model_fields
    values = {name: invalid_value(name, field, tmp_path) for name, field in fields.items()}
    uncovered = sorted(name for name, value in values.items() if value is None)
    assert not uncovered, f"no invalid value can be derived for {uncovered}: give them bounds or a TEXT_INVALID entry"

    base = ["serve", "--check-config", "--model", str(tiny_checkpoint)]
    cases = []  # (label, args, env, what the error line must name)
    for index, (name, value) in enumerate(values.items()):
        flag, env_var = f"--{name.replace('_', '-')}", f"AGENTPRM_{name.upper()}"
        args = [a for a in base if name != "model" or a not in ("--model", str(tiny_checkpoint))]
        if index % 2 == 0:  # every other setting as a flag, the rest as environment variables: both paths
            # `--flag=value` (a switch refuses any value: argparse's error, which is one line too)
            cases.append((f"{flag}={value}", [*args, f"{flag}={value}"], clean_env(), flag))
        else:
            cases.append((f"{env_var}={value}", args, clean_env(**{env_var: value}), env_var))

    with ThreadPoolExecutor(max_workers=4) as pool:
        valid = pool.submit(run, base, tmp_path, clean_env())
        results = list(pool.map(lambda case: run(case[1], tmp_path, case[2]), cases))

    ok = valid.result()
    assert ok.returncode == 0 and "config ok" in ok.stdout, ok.stderr  # the bad value alone is what fails
    failures = []
    for (label, _, _, named), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        if (result.returncode != 2 or len(lines) != 1 or "Traceback" in result.stderr
                or not lines[0].startswith("agentprm: error:") or named not in lines[0]):
            failures.append(f"{label}: exit {result.returncode}, stderr {result.stderr.strip()[-400:]!r}")
    assert not failures, "\n".join(failures)


def test_the_error_line_says_what_the_bound_is_and_never_echoes_a_key(tiny_checkpoint, tmp_path):
    too_small = run(["serve", "--check-config", "--model", str(tiny_checkpoint)], tmp_path,
                    clean_env(AGENTPRM_MAX_BODY_BYTES="1000"))
    assert too_small.stderr.strip() == ("agentprm: error: invalid setting AGENTPRM_MAX_BODY_BYTES=1000: "
                                        "Input should be greater than or equal to 1024")
    bad_key = run(["serve", "--check-config", "--model", str(tiny_checkpoint), "--api-key", "sec ret"], tmp_path,
                  clean_env())
    assert bad_key.returncode == 2 and "sec ret" not in bad_key.stderr and "whitespace" in bad_key.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_for_serve_and_score(tiny_checkpoint, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"task": "t", "steps": [{"observation": "o", "action": "a"}]}\n')
    for args in (["serve", "--model", str(tiny_checkpoint), "--device", "cuda"],
                 ["score", str(data), "--model", str(tiny_checkpoint), "--device", "cuda:1"]):
        result = run(args, tmp_path, clean_env())
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "no CUDA GPU is available" in result.stderr
