#!/usr/bin/env bash
# Smoke build of the bench image on a machine with no GPU and no image registry.
#
#   sudo bash docker/smoke.sh [SUMMARY_DIR]
#
# 1. makes a Debian bookworm base image with debootstrap + `docker import`
#    when it is missing (cached as $SMOKE_BASE; the mirror is the one this
#    machine's apt already uses);
# 2. builds docker/Dockerfile from it with --network host and PyPI's torch;
# 3. runs the container twice, with no network: `gpuload doctor --arch sm_86`
#    (no GPU needed), then the bench entrypoint with `--preset tiny` on the CPU
#    into a mounted folder.
#
# Exits non-zero when any step fails. Starts dockerd when none answers and
# stops it at the end; removes the image it built (SMOKE_KEEP_IMAGE=1 keeps
# it) and its temporary folders; keeps the base image for the next run.
# With SUMMARY_DIR, writes summary.md (command, image size, build time, both
# containers' output) and the bench's results there.
#
# Needs root (dockerd, debootstrap) and: apt-get install -y docker.io debootstrap
set -euo pipefail

BASE=${SMOKE_BASE:-gpuload-smoke-base:bookworm}
IMAGE=${SMOKE_IMAGE:-gpuload-bench:smoke}
# PyTorch's own index is not reachable from the development machines, so
# torch comes from pip's configured default index (an empty TORCH_INDEX
# build argument: the image names no index). PyPI's default wheels moved to
# CUDA 13 at torch 2.11
# (their nvidia-* dependencies say so); 2.10.0 is the newest built for CUDA
# 12.8, the image's CUDA, so pip resolves torch's nvidia-*-cu12 pins against
# the cu12 extra (cupy, kvikio, numba-cuda) as it does in a GPU user's build.
TORCH_INDEX=${SMOKE_TORCH_INDEX:-}
TORCH_SPEC=${SMOKE_TORCH_SPEC:-torch==2.10.0}
SUMMARY_DIR=${1:-}

cd "$(dirname "$0")/.."
# The tree being built, read before the summary's own files dirty it.
REV=$(git describe --always --dirty 2>/dev/null || echo unknown)
WORK=$(mktemp -d /tmp/gpuload-smoke.XXXXXX)
DOCKERD_PID=""
BUILT=""

say() { printf '[smoke] %s\n' "$*" >&2; }

cleanup() {
    local rc=$?
    if [[ -n $BUILT && ${SMOKE_KEEP_IMAGE:-0} != 1 ]]; then
        docker image rm -f "$IMAGE" >/dev/null 2>&1 || true
    fi
    if [[ -n $DOCKERD_PID ]]; then
        say "stopping the dockerd this script started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    # An interrupted debootstrap can leave /proc or /sys mounted in the
    # rootfs: unmount before deleting, and never cross into another filesystem.
    findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | xargs -r umount -l || true
    rm -rf --one-file-system "$WORK"
    if [[ $rc -eq 0 ]]; then say "OK"; else say "FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT

for tool in docker dockerd debootstrap tar; do
    command -v "$tool" >/dev/null || {
        say "$tool is missing: apt-get install -y docker.io debootstrap"
        exit 1
    }
done

# --- the daemon -------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    say "no docker daemon answers: starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { cat "$WORK/dockerd.log" >&2; exit 1; }
        sleep 1
    done
    docker info >/dev/null
fi

# --- the base image ---------------------------------------------------------
# The Debian mirror this machine's apt uses (deb822 .sources or one-line
# sources.list), so the script reaches whatever mirror the machine can reach.
debian_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -e $f ]] || continue
        awk '/^URIs:/ { u = $2 } /^Suites:/ && / bookworm( |$)/ && u { print u; exit }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -e $f ]] || continue
        awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' "$f"
    done
}

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    MIRROR=${SMOKE_MIRROR:-$(debian_mirror | head -n1)}
    [[ -n $MIRROR ]] || { say "no bookworm mirror in /etc/apt: set SMOKE_MIRROR"; exit 1; }
    say "making $BASE with debootstrap from $MIRROR"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    # pip in the build trusts what this machine trusts (a TLS-inspecting
    # proxy's CA, for one): the host's bundle goes into the base, named by
    # PIP_CERT. minbase has no ca-certificates of its own.
    mkdir -p "$WORK/rootfs/etc/ssl"
    cp "${SMOKE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" \
        "$WORK/rootfs/etc/ssl/smoke-host-ca.crt"
    # An imported image has no environment: without PATH the Dockerfile's
    # PATH=/opt/venv/bin:$PATH would leave apt-get unreachable.
    tar -C "$WORK/rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/smoke-host-ca.crt' \
        --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

# --- the build --------------------------------------------------------------
# The context goes in as a tar of exactly what the Dockerfile copies: the
# legacy builder (Debian's docker.io has no buildx) ignores
# docker/Dockerfile.dockerignore and would otherwise send .venv and all.
say "building $IMAGE from $BASE (torch: $TORCH_SPEC from ${TORCH_INDEX:-pip's default index})"
BUILD_CMD=(docker build --network host --force-rm -f docker/Dockerfile -t "$IMAGE"
    --build-arg "CUDA_IMAGE=$BASE" --build-arg "TORCH_INDEX=$TORCH_INDEX"
    --build-arg "TORCH_SPEC=$TORCH_SPEC" -)
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
t0=$(date +%s)
BUILT=1
tar -c --exclude=__pycache__ pyproject.toml README.md gpuload kernels docker/Dockerfile \
    | "${BUILD_CMD[@]}" >"$WORK/build.log" 2>&1 \
    || { tail -n 60 "$WORK/build.log" >&2; exit 1; }
BUILD_S=$(($(date +%s) - t0))
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
say "built in ${BUILD_S} s, $((SIZE >> 20)) MiB"

# --- the two runs -----------------------------------------------------------
mkdir -p "$WORK/results" "$WORK/cache"
# gpuload doctor: versions, and the gather kernels compiled and linked for
# one architecture with the image's NVVM and nvJitLink, which needs no GPU
# (sm_86: the RTX 3060 12 GB; any `--arch` doctor knows will do).
RUN1=(docker run --rm --network none --entrypoint gpuload "$IMAGE"
    doctor --arch "${SMOKE_ARCH:-sm_86}")
say "run 1: ${RUN1[*]}"
"${RUN1[@]}" >"$WORK/run1.log" 2>&1 || { cat "$WORK/run1.log" >&2; exit 1; }
cat "$WORK/run1.log" >&2

RUN2=(docker run --rm --network none -v "$WORK/results:/results" -v "$WORK/cache:/cache"
    "$IMAGE" --preset tiny --device cpu)
say "run 2: ${RUN2[*]}"
t0=$(date +%s)
"${RUN2[@]}" >"$WORK/run2.log" 2>&1 || { tail -n 60 "$WORK/run2.log" >&2; exit 1; }
RUN2_S=$(($(date +%s) - t0))
tail -n 20 "$WORK/run2.log" >&2
for ext in md json; do
    [[ -s $WORK/results/gpuload-bench-tiny-cpu.$ext ]] || {
        say "run 2 wrote no gpuload-bench-tiny-cpu.$ext into the mounted /results"
        exit 1
    }
done

# --- the summary ------------------------------------------------------------
if [[ -n $SUMMARY_DIR ]]; then
    mkdir -p "$SUMMARY_DIR"
    cp "$WORK"/results/* "$SUMMARY_DIR/"
    cp "$WORK/build.log" "$SUMMARY_DIR/build.log"
    {
        echo "# Docker smoke build, $(date -u +%Y-%m-%d)"
        echo
        echo "Made by \`bash docker/smoke.sh $SUMMARY_DIR\` at commit" \
            "$REV" \
            "on $(uname -m), $(nproc) cores, docker $(docker version -f '{{.Server.Version}}')."
        echo
        echo "- base: \`$BASE\` (debootstrap bookworm minbase, docker import)"
        echo "- build: \`${BUILD_CMD[*]}\` (context: a tar of pyproject.toml README.md" \
            "gpuload kernels docker/Dockerfile), DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-default}"
        echo "- build time: ${BUILD_S} s (downloads included; the machine was shared);" \
            "$(grep -c 'Using cache' "$WORK/build.log" || true) of" \
            "$(grep -c '^Step ' "$WORK/build.log" || true) steps from the layer cache"
        echo "- image size: $((SIZE >> 20)) MiB ($SIZE bytes, as docker image inspect reports)"
        echo "- bench run time: ${RUN2_S} s; the whole script so far: ${SECONDS} s"
        echo
        echo "## Versions in the image"
        echo
        echo '```'
        docker run --rm --network none --entrypoint python "$IMAGE" -c '
import importlib.metadata as m, sys
print("python", sys.version.split()[0])
for d in ("gpuload", "torch", "numpy", "numba", "numba-cuda", "cupy-cuda12x", "kvikio-cu12",
          "fastsafetensors", "runai-model-streamer", "instanttensor", "safetensors"):
    try:
        print(d, m.version(d))
    except m.PackageNotFoundError:
        print(d, "not installed")
names = sorted((d.metadata["Name"], d.version) for d in m.distributions())
print("CUDA wheels:", ", ".join(n + " " + v for n, v in names
                                if n.lower().startswith(("nvidia-", "cuda-"))))'
        echo '```'
        echo
        echo "## Run 1: \`${RUN1[*]}\`"
        echo
        echo '```'
        cat "$WORK/run1.log"
        echo '```'
        echo
        echo "## Run 2: \`docker run --rm --network none -v RESULTS:/results -v CACHE:/cache" \
            "$IMAGE --preset tiny --device cpu\`"
        echo
        echo '```'
        cat "$WORK/run2.log"
        echo '```'
    } >"$SUMMARY_DIR/summary.md"
    say "summary: $SUMMARY_DIR/summary.md"
fi
