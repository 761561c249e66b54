#!/usr/bin/env bash
# Build the root Dockerfile with buildah (no Docker engine needed), run the image, and check that it serves.
#
#   docker/build-local.sh            base image (cached) -> build -> run -> /ready 200 -> 3-step /v1/score
#   docker/build-local.sh base       only make the Debian bookworm base image (debootstrap, cached)
#   docker/build-local.sh clean      remove this script's images, containers and caches
#
# Contract: exits 0 only when the built image answered /ready with 200, its own HEALTHCHECK command passed
# inside the container, and POST /v1/score returned 3 steps for a 3-step trajectory. Prints the image size
# and the build time. Idempotent: the debootstrap rootfs and the base image are cached, the build reuses
# buildah's layer cache, and every container it starts is removed on exit (also on failure or Ctrl-C).
#
# The CPU image is built FROM a bookworm base made here with debootstrap (python3.11) and installs the
# local CPU torch wheel (TORCH_WHEEL, served to the build on 127.0.0.1) instead of PyPI's multi-GB CUDA build. Needs root, `buildah` and `debootstrap` (apt-get install buildah debootstrap).
#
# Settings (environment): IMAGE (tag to build), PORT (host port the server binds; chroot isolation
# shares the host network), TORCH_WHEEL, DEBIAN_MIRROR, AGENTPRM_DOCKER_CACHE (rootfs cache folder),
# STORAGE_DRIVER (default vfs), READY_TIMEOUT_S.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${AGENTPRM_DOCKER_CACHE:-/var/tmp/agentprm-docker}
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
BASE_IMAGE=${BASE_IMAGE:-localhost/agentprm-base:bookworm}
IMAGE=${IMAGE:-localhost/agentprm-serve:cpu}
PORT=${PORT:-18000}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-180}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
if [[ -z "${TORCH_WHEEL+x}" ]]; then
    TORCH_WHEEL=$(find /opt/wheels /opt/pypi -maxdepth 2 -name 'torch-2.13.0+cpu-cp311-*.whl' 2>/dev/null | head -n 1 || true)
fi

bah() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
log() { printf '[build-local] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
alive() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $state != Z* ]]; }

need() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "'$tool' is missing (apt-get install buildah debootstrap curl)"
    done
    [[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and buildah's chroot isolation need it)"
}

# --- base image: Debian bookworm minbase made with debootstrap, imported with buildah ---------------------
make_base() {
    if bah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE: cached"
        return
    fi
    local tarball="$CACHE/bookworm-rootfs.tar"
    mkdir -p "$CACHE"
    if [[ ! -s "$tarball" ]]; then
        local rootfs="$CACHE/rootfs.partial"
        rm -rf "$rootfs"
        log "debootstrap bookworm (minbase) into $rootfs"
        debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" >&2
        cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
        # Slim like the official debian:bookworm-slim: no apt lists, caches, docs or man pages.
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
            "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
        tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" .
        mv "$tarball.partial" "$tarball"
        rm -rf "$rootfs"
    fi
    log "importing $tarball as $BASE_IMAGE"
    local ctr
    ctr=$(bah from scratch)
    bah add "$ctr" "$tarball" / >/dev/null
    bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd /bin/bash --os linux --arch amd64 --label org.opencontainers.image.description="Debian bookworm (debootstrap minbase)" "$ctr"
    bah commit --rm "$ctr" "$BASE_IMAGE" >/dev/null
}

case "${1:-test}" in
    base) need buildah debootstrap; make_base; exit 0 ;;
    clean)
        bah rm --all >/dev/null 2>&1 || true
        bah rmi --force "$IMAGE" "$IMAGE-builder" "$BASE_IMAGE" >/dev/null 2>&1 || true
        bah rmi --prune >/dev/null 2>&1 || true
        rm -rf "$CACHE"
        log "removed images, containers and $CACHE"
        exit 0 ;;
    test) ;;
    *) die "usage: $0 [test|base|clean]" ;;
esac

need buildah debootstrap curl python3
[[ -s "$HOST_CA" ]] || die "no CA bundle at $HOST_CA (set HOST_CA)"

WORK=$(mktemp -d /var/tmp/agentprm-image-test.XXXXXX)
WHEEL_SERVER_PID="" SERVER_PID="" CTR=""
cleanup() {
    local rc=$?
    if [[ -n "$SERVER_PID" ]] && alive "$SERVER_PID" 2>/dev/null; then
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 40); do alive "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
    [[ -n "$WHEEL_SERVER_PID" ]] && kill "$WHEEL_SERVER_PID" 2>/dev/null || true
    [[ -n "$CTR" ]] && bah rm "$CTR" >/dev/null 2>&1 || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

base_start=$(date +%s)
make_base
base_s=$(( $(date +%s) - base_start ))

# --- build ---------------------------------------------------------------------------------------------
# The local CPU torch wheel reaches the build through a find-links page served on 127.0.0.1 (chroot
# isolation shares the host network), so the multi-GB CUDA wheel is never fetched and the wheel is not
# copied into the build context. A fixed port keeps the build argument, and so the layer cache, stable.
# TRITON_BUILD_DEPS empty: the CPU image has no Triton, so no compiler or Python headers (the GPU image's default).
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg PIP_CERT=/host-ca.crt --build-arg TRITON_BUILD_DEPS=)
if [[ -n "$TORCH_WHEEL" ]]; then
    [[ -s "$TORCH_WHEEL" ]] || die "TORCH_WHEEL=$TORCH_WHEEL does not exist"
    WHEEL_PORT=${WHEEL_PORT:-18999}
    python3 -m http.server --bind 127.0.0.1 --directory "$(dirname "$TORCH_WHEEL")" "$WHEEL_PORT" \
        >"$WORK/wheel-server.log" 2>&1 &
    WHEEL_SERVER_PID=$!
    for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$WHEEL_PORT/" >/dev/null && break; sleep 0.2; done
    curl -sf "http://127.0.0.1:$WHEEL_PORT/" | grep -q "$(basename "$TORCH_WHEEL" | sed 's/+/%2B/')" \
        || die "the wheel server on 127.0.0.1:$WHEEL_PORT does not list $(basename "$TORCH_WHEEL") (port taken?)"
    torch_version=$(basename "$TORCH_WHEEL" | cut -d- -f2)
    build_args+=(--build-arg "TORCH_VERSION=$torch_version" --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$WHEEL_PORT/")
    log "torch $torch_version from $TORCH_WHEEL"
else
    log "no local torch wheel: torch comes from PyPI (the CUDA build, several GB)"
fi

log "building $IMAGE (storage driver $STORAGE_DRIVER, chroot isolation)"
build_start=$(date +%s)
bud=(bud --isolation chroot --layers --format docker --pull=missing -v "$HOST_CA:/host-ca.crt:ro" "${build_args[@]}"
     -f "$ROOT/Dockerfile")
# The builder stage gets a tag of its own so that pruning below never removes a layer the cache still needs.
bah "${bud[@]}" --target builder -t "$IMAGE-builder" "$ROOT" >&2
bah "${bud[@]}" -t "$IMAGE" "$ROOT" >&2
build_s=$(( $(date +%s) - build_start ))
# Untagged leftovers of earlier builds (vfs stores every layer as a full copy): remove them, leaf by leaf.
# This prunes every untagged image in buildah's storage, not only this script's.
for _ in $(seq 1 40); do
    [[ -n "$(bah images --all --quiet --filter dangling=true)" ]] || break
    bah rmi --prune >/dev/null 2>&1 || break
done
if [[ -n "$WHEEL_SERVER_PID" ]]; then kill "$WHEEL_SERVER_PID" 2>/dev/null || true; WHEEL_SERVER_PID=""; fi

# --- run -----------------------------------------------------------------------------------------------
bah inspect --type image "$IMAGE" >"$WORK/image.json"
mapfile -t ENTRYPOINT < <(python3 -c 'import json,sys; [print(a) for a in json.load(open(sys.argv[1]))["Docker"]["config"]["Entrypoint"]]' "$WORK/image.json")
mapfile -t HEALTHCHECK < <(python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["Docker"]["config"]["Healthcheck"]["Test"]; assert t[0]=="CMD", t; [print(a) for a in t[1:]]' "$WORK/image.json")
[[ ${#ENTRYPOINT[@]} -gt 0 ]] || die "the image has no ENTRYPOINT"
[[ ${#HEALTHCHECK[@]} -gt 0 ]] || die "the image has no HEALTHCHECK"

CTR=$(bah from --pull-never --name "agentprm-image-test-$$" "$IMAGE")
run_opts=(--isolation chroot --env "AGENTPRM_PORT=$PORT" --env AGENTPRM_DEVICE=cpu)
uid=$(bah run "${run_opts[@]}" "$CTR" -- id -u)
[[ "$uid" != 0 ]] || die "the image runs as root"
log "the image runs as uid $uid"

model_note="shipped default checkpoint"
if ! bah run "${run_opts[@]}" "$CTR" -- sh -c 'ls /models/*/*/manifest.json' >/dev/null 2>&1; then
    # No checkpoint shipped yet: mount a store volume at /models and let the image write a random one into it.
    mkdir -p "$WORK/models" && chown "$uid" "$WORK/models"
    run_opts+=(--volume "$WORK/models:/models" --env AGENTPRM_MODEL=image-test)
    bah run "${run_opts[@]}" "$CTR" -- agentprm model init-random /models/image-test/1 --name image-test >&2
    model_note="random checkpoint written by the image into a mounted /models volume"
fi

log "starting: ${ENTRYPOINT[*]} (port $PORT, $model_note)"
setsid buildah --storage-driver "$STORAGE_DRIVER" run "${run_opts[@]}" "$CTR" -- "${ENTRYPOINT[@]}" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
url="http://127.0.0.1:$PORT"
deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
until [[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/ready" || true)" == 200 ]]; do
    if ! alive "$SERVER_PID" 2>/dev/null || (( $(date +%s) > deadline )); then
        tail -n 40 "$WORK/server.log" >&2
        die "the server did not become ready on $url within ${READY_TIMEOUT_S}s"
    fi
    sleep 1
done
log "/ready: 200"

bah run "${run_opts[@]}" "$CTR" -- "${HEALTHCHECK[@]}" || die "the image's HEALTHCHECK command failed"
log "HEALTHCHECK command: ok"

curl -sS -f "$url/v1/score" -H 'content-type: application/json' -o "$WORK/score.json" -d '{
  "model": "default", "trajectories": [{"task": "go to the red ball", "steps": [
    {"observation": "You see a wall 2 steps ahead.", "action": "turn left"},
    {"observation": "You see a red ball 3 steps ahead.", "action": "move forward"},
    {"observation": "You see a red ball 1 step ahead.", "action": "move forward"}]}]}' \
    || { tail -n 40 "$WORK/server.log" >&2; die "POST /v1/score failed"; }
python3 - "$WORK/score.json" <<'PY' || die "unexpected /v1/score response: $(cat "$WORK/score.json")"
import json, sys
body = json.load(open(sys.argv[1]))
steps = body["results"][0]["steps"]
assert len(steps) == 3, steps
assert all(0.0 <= s["promise"] <= 1.0 for s in steps), steps
print(f"[build-local] /v1/score: 3 steps, promises {[round(s['promise'], 4) for s in steps]}, model {body['model']}",
      file=sys.stderr)
PY
curl -sf "$url/metrics" | grep -q '^agentprm_requests_total{' || die "/metrics has no agentprm_requests_total"

# Graceful stop: SIGTERM to the server process, as `docker stop` and Kubernetes send it to PID 1. The server
# drains (AGENTPRM_DRAIN_TIMEOUT_S) and exits 0; buildah run passes that exit code on.
server_pid=$(ps -o pid=,args= -s "$SERVER_PID" | awk '$2 ~ /python/ && /agentprm serve/ {print $1; exit}')
[[ -n "$server_pid" ]] || die "cannot find the server process under buildah run"
kill -TERM "$server_pid"
stopped=no
for _ in $(seq 1 60); do alive "$SERVER_PID" 2>/dev/null || { stopped=yes; break; }; sleep 1; done
[[ $stopped == yes ]] || die "the server did not stop within 60 s of SIGTERM"
stop_rc=0
wait "$SERVER_PID" || stop_rc=$?
SERVER_PID=""
if [[ $stop_rc -ne 0 ]]; then tail -n 20 "$WORK/server.log" >&2; die "after SIGTERM the server exited with $stop_rc, not 0"; fi
log "SIGTERM: drained and exited 0"

size=$(bah images --format '{{.Size}}' "$IMAGE" | head -n 1)
printf 'image-test: OK  image %s  size %s  build time %ss (base image %ss)\n' "$IMAGE" "$size" "$build_s" "$base_s"
