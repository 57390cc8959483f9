#!/usr/bin/env bash
# One step of the GPU work, for one call of the device tool (each under its
# 10-minute limit), with .whl carried (bench/gpu/wheels.sh made it; the
# device tool's run takes carry=[".whl"]):
#
#   bash bench/gpu/session.sh tests        # the gpu test tier
#   bash bench/gpu/session.sh gather       # bench/gather.py: the kernel, the 3 gather strategies
#   bash bench/gpu/session.sh strategies   # gpuload bench, shard warm: auto vs each forced gather
#   bash bench/gpu/session.sh warm         # gpuload bench --preset 12gb, warm runs
#   bash bench/gpu/session.sh cold         # the same, cold runs
#
# Each writes machine-<step>.txt and its own output under $OUT (the device tool's
# folder that comes back), to be committed under bench/results/<date>-<gpu>/.
# That machine cannot fetch anything: gpuload is not pip-installed but laid
# out under /tmp/gl (kernels/ as gpuload.kernels, as the wheel ships it).
set -uo pipefail
cd "$(dirname "$0")/../.."
step=${1:?usage: session.sh tests|gather|strategies|warm|cold}
OUT=${OUT:-/tmp/gpuload-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
rm -rf /tmp/gl && mkdir -p /tmp/gl && cp -r gpuload /tmp/gl/ && cp -r kernels /tmp/gl/gpuload/kernels
export PYTHONPATH=/tmp/gl:/tmp/site${PYTHONPATH:+:$PYTHONPATH}

{
    echo "# $(date -u +%FT%TZ) step=$step commit=$(git rev-parse --short HEAD 2>/dev/null || echo ?)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 - <<'PY'
import importlib
for name in ("cupy", "numba", "numba_cuda", "kvikio", "torch", "numpy", "safetensors",
             "fastsafetensors", "runai_model_streamer", "instanttensor"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "unavailable:", type(e).__name__, str(e)[:120])
import cupy
print("CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "driver", cupy.cuda.runtime.driverGetVersion())
PY
} > "$OUT/machine-$step.txt" 2>&1

case "$step" in
tests)
    # (pytest-timeout is in that image; if not, its ini option must not stop the run)
    python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::pytest.PytestConfigWarning --ignore=tests/cudasim tests 2>&1 | tee "$OUT/gpu-tests.txt"
    ;;
gather)
    python3 bench/gather.py 2>&1 | tee "$OUT/gather.md"
    ;;
strategies)
    python3 -m gpuload bench --preset 12gb --modes warm --scenarios shard --ranks 0 \
        --contenders 'gpuload \(posix' --cache-dir /tmp/gpuload-cache --out "$OUT" 2>&1 \
        | tee "$OUT/bench-strategies.txt"
    ;;
warm | cold)
    python3 -m gpuload bench --preset 12gb --modes "$step" \
        --cache-dir /tmp/gpuload-cache --out "$OUT" 2>&1 | tee "$OUT/bench-$step.txt"
    ;;
*)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
