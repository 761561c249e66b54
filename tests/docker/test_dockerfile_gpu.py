"""The GPU image can run what the GPU path needs: a CUDA 13 base image matching PyPI's torch 2.13.0 build (so an
old driver is refused by the container toolkit, not silently served on the CPU), the driver requirement
documented, and a C compiler plus the Python headers in the runtime stage for Triton's launcher."""

from __future__ import annotations

import re

from tests.docker.test_dockerfile import DOCKERFILE, final_stage, instructions


def test_base_image_is_cuda_13_like_the_torch_wheel():
    base = instructions()[0][1]
    match = re.fullmatch(r"BASE_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.(\d+)-base-ubuntu24\.04", base)
    assert match and int(match.group(1)) == 13, base
    text = DOCKERFILE.read_text()
    assert "driver >= 580" in text  # CUDA 13's minimum driver, stated where the image is built


def test_runtime_stage_installs_a_compiler_and_python_headers_for_triton():
    stage = final_stage()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1].strip('"') for k, rest in stage if k == "ARG" and "=" in rest}
    deps = args.get("TRITON_BUILD_DEPS", "").split()
    assert "gcc" in deps and "python3-dev" in deps and "libc6-dev" in deps
    runs = [rest for k, rest in stage if k == "RUN"]
    assert any("$TRITON_BUILD_DEPS" in r and "apt-get install" in r for r in runs)
    # Installed before the non-root user takes over (apt needs root).
    keywords = [k for k, _ in stage]
    install = next(i for i, (k, r) in enumerate(stage) if k == "RUN" and "$TRITON_BUILD_DEPS" in r)
    assert install < keywords.index("USER")


def test_the_local_cpu_build_leaves_the_compiler_out():
    """docker/build-local.sh builds the CPU image (no Triton there): it empties TRITON_BUILD_DEPS for every build
    call, and the Dockerfile installs nothing when the list is empty."""
    script = (DOCKERFILE.parent / "docker" / "build-local.sh").read_text()
    build_args = re.search(r"^build_args=\((.*)\)$", script, re.MULTILINE)
    assert build_args and re.search(r"--build-arg TRITON_BUILD_DEPS=(\s|$)", build_args.group(1) + " ")
    assert '"${build_args[@]}"' in script.split("bud=(", 1)[1].split(")", 1)[0]  # every bud call takes them
    install = next(r for k, r in final_stage() if k == "RUN" and "$TRITON_BUILD_DEPS" in r)
    assert re.match(r'if \[ -n "\$TRITON_BUILD_DEPS" \]; then', install), install
