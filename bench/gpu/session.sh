#!/usr/bin/env bash
# The GPU work for the device tool, with .whl carried (bench/gpu/wheels.sh
# made it; the device tool's run takes carry=[".whl"]):
#
#   bash bench/gpu/session.sh all        # everything below, in one call, within 8 minutes
#   bash bench/gpu/session.sh doctor     # gpuload doctor --gpu (versions, devices, kernels linked)
#   bash bench/gpu/session.sh tests      # the gpu test tier
#   bash bench/gpu/session.sh gather     # bench/gather.py: the kernel, the 3 gather strategies
#   bash bench/gpu/session.sh strategies # gpuload bench, shard warm: auto vs each forced gather
#   bash bench/gpu/session.sh warm       # gpuload bench, warm runs
#   bash bench/gpu/session.sh cold       # the same, cold runs
#   bash bench/gpu/session.sh ab         # bench/gpu/ab.py: backend auto/posix/kvikio, torch
#                                        # allocator vs raw results, kernel vs device memcpy
#
# Output goes under $OUT (the device tool's folder that comes back, which
# takes at most 8 files at its top): machine.txt, doctor.txt, gpu-tests.txt,
# gather.md, ab.md, and folders strategies/, warm/ and cold/ with each bench's log and report.
# Commit it under bench/results/<date>-<gpu>/. Without a GPU the bench steps
# say so and skip, and the test tier is collected and skipped.
#
# That machine cannot fetch anything: gpuload is not pip-installed but laid
# out under $SESSION_DIR (default /tmp/gl) with kernels/ copied in as
# gpuload/kernels (the link followed), as the wheel ships it, and every step
# runs *from there*, so nothing depends on the checkout's own layout.
# Only `python3` on PATH is used ($PYTHON overrides it).
set -uo pipefail
cd "$(dirname "$0")/../.."
step=${1:?usage: session.sh all|doctor|tests|gather|strategies|warm|cold|ab}
OUT=${OUT:-/tmp/gpuload-out}
GL=${SESSION_DIR:-/tmp/gl}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
commit=$(git rev-parse --short HEAD 2>/dev/null || echo ?)

WHL=${SESSION_WHEELS:-.whl}  # the wheels for the lent machine's Python (3.12)
if ls "$WHL"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$GL-site" "$WHL"/*.whl || exit 1
fi
rm -rf "$GL" && mkdir -p "$GL"
cp -rL gpuload tests bench pyproject.toml "$GL"/
export PYTHONPATH=$GL:$GL-site${PYTHONPATH:+:$PYTHONPATH}
cd "$GL" || exit 1

machine() {
    echo "# $(date -u +%FT%TZ) step=$step commit=$commit"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    "$PY" - <<'PY'
import importlib
for name in ("gpuload", "cupy", "numba", "numba_cuda", "kvikio", "torch", "numpy", "safetensors",
             "pytest", "hypothesis", "fastsafetensors", "runai_model_streamer", "instanttensor"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:  # noqa: BLE001
        print(name, "unavailable:", type(e).__name__, str(e)[:120])
PY
}

has_gpu() {
    "$PY" -c "import cupy, sys; sys.exit(cupy.cuda.runtime.getDeviceCount() < 1)" 2>/dev/null
}

run_step() {  # run_step STEP SECONDS: one step, its output under $OUT
    local s=$1 limit=$2
    case "$s" in
    doctor)
        # --gpu: a GPU session checks the GPU path, GPU or not (a missing one is a finding)
        timeout "$limit" "$PY" -m gpuload doctor --gpu 2>&1 | tee "$OUT/doctor.txt"
        # doctor's exit status says whether it found a problem: a finding, not a failed step
        return 0
        ;;
    tests)
        # (-p no:cacheprovider: nothing written into the copy; the ini's timeout
        # option must not stop a run where pytest-timeout is absent)
        timeout "$limit" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
            -W ignore::pytest.PytestConfigWarning \
            --ignore=tests/cudasim --ignore=tests/realpkg tests 2>&1 | tee "$OUT/gpu-tests.txt"
        ;;
    gather)
        timeout "$limit" "$PY" bench/gather.py --mib 128 --reps 10 2>&1 | tee "$OUT/gather.md"
        ;;
    ab)
        timeout "$limit" "$PY" bench/gpu/ab.py --mib 256 --runs 3 2>&1 | tee "$OUT/ab.md"
        ;;
    strategies | warm | cold)
        mkdir -p "$OUT/$s"
        if ! has_gpu; then
            echo "no usable GPU: the $s bench is skipped" | tee "$OUT/$s/bench.txt"
            return 0
        fi
        # A preset that fits the 8 minutes: the 12gb preset's settings, smaller models.
        local how=(--modes "$s" --scenarios full,shard --worlds 2)
        if [ "$s" = strategies ]; then
            how=(--modes warm --scenarios shard --ranks 0 --contenders 'gpuload \(posix')
        fi
        timeout "$limit" "$PY" -m gpuload bench --preset 12gb "${how[@]}" --dense-gib 4 \
            --moe-gib 4 --runs 3 --warmup 1 --cache-dir /tmp/gpuload-cache --out "$OUT/$s" \
            --no-plot 2>&1 | tee "$OUT/$s/bench.txt"
        ;;
    *)
        echo "unknown step $s" >&2
        return 2
        ;;
    esac
}

if [ "$step" = all ]; then
    machine > "$OUT/machine.txt" 2>&1
    rc=0
    # 8 minutes in all, the tool's limit is 10: each step has its own share.
    for s in doctor:60 tests:130 gather:55 ab:40 strategies:55 warm:70 cold:70; do
        echo "## ${s%%:*} $(date -u +%T)" >> "$OUT/machine.txt"
        run_step "${s%%:*}" "${s##*:}" || { echo "step ${s%%:*} failed" >&2; rc=1; }
    done
    exit $rc
fi
machine > "$OUT/machine-$step.txt" 2>&1
run_step "$step" 540
