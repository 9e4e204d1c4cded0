#!/usr/bin/env bash
# The GPU check, in one call that fits a short GPU lease (docs/gpu.md): the CuPy backend's parity tests with a GPU
# required, then benchmarks/bench_gpu.py part by part, most important first, each under its own time limit; every
# log, the results and a summary land in one folder, and the summary is printed last.
#
#   tools/gpu_check.sh [OUT_DIR]            # default: $OUT where it is set (the device tool), else gpu-check-out/
#   tools/gpu_check.sh --smoke [OUT_DIR]    # on any machine, a CPU one too: checks this script, times nothing useful
#
# Python: $PYTHON if given; else python3 where it already imports CuPy, onnx and typer (fdsub_onnx is installed
# into it editable, without dependencies: a GPU image without a package index); else a venv, .venv-gpu, with the
# gpu, test and bench extras from the index. GPU_CHECK_SECONDS (default 420) bounds the whole run: a step that
# would start with less than a minute left is skipped, and said so.
set -u
smoke=""
if [ "${1:-}" = "--smoke" ]; then smoke="--smoke"; shift; fi
out=${1:-${OUT:-gpu-check-out}}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
summary="$out/summary.txt"
: >"$summary"
budget=${GPU_CHECK_SECONDS:-420}
start=$(date +%s)
export PYTHONUNBUFFERED=1

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$summary"; }
left() { echo $((budget - ($(date +%s) - start))); }

# step NAME SECONDS COMMAND...: run it under min(SECONDS, what is left) with its output in $out/NAME.log
step() {
    local name=$1 limit=$2 rest
    shift 2
    rest=$(left)
    if [ "$rest" -lt 60 ]; then say "$name: skipped ($rest s of the ${budget} s budget left)"; return 0; fi
    [ "$limit" -gt "$rest" ] && limit=$rest
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    say "$name: exit $rc after $(($(date +%s) - t0)) s (limit $limit s; log $name.log)"
    return 0
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ {print int($2 / 1048576) " GiB"}' /proc/meminfo)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
} >"$out/env.txt"

if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif python3 -c "import cupy, onnx, typer" >/dev/null 2>&1; then
    py=python3
    python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
        || { say "installing fdsub_onnx into $(command -v python3) failed (install.log)"; cat "$summary"; exit 1; }
elif [ -n "$smoke" ] && [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    python3 -m venv .venv-gpu && .venv-gpu/bin/python -m pip install -q -e ".[gpu,test,bench]" >"$out/install.log" 2>&1 \
        || { say "installing the gpu extra into .venv-gpu failed (install.log)"; cat "$summary"; exit 1; }
    py=.venv-gpu/bin/python
fi
"$py" - >>"$out/env.txt" 2>&1 <<'EOF'
import sys, numpy, onnx, onnxruntime
print("python", sys.version.split()[0], sys.executable)
print("numpy", numpy.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers())
try:
    import cupy
    print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "driver", cupy.cuda.runtime.driverGetVersion(), cupy.cuda.runtime.getDeviceProperties(0)["name"])
except Exception as error:  # the summary says it; the tests below say why
    print("cupy: not usable:", error)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except Exception as error:
    print("torch: not usable:", error)
EOF
say "python: $py; $(grep -E '^(cupy|numpy|torch)' "$out/env.txt" | tr '\n' ';')"

require=1
[ -n "$smoke" ] && require=0
step tests 180 env FDSUB_REQUIRE_GPU=$require "$py" -m pytest -q -rs -p no:cacheprovider tests/compose/test_gpu.py
say "tests: $(grep -E '(passed|failed|error)' "$out/tests.log" | tail -1)"

threads=$(nproc)
step bench-vgg19 180 "$py" benchmarks/bench_gpu.py $smoke --threads "$threads" --parts ceilings weights \
    --networks vgg19 --json "$out/gpu-vgg19.json"
step bench-light-vgg19 120 "$py" benchmarks/bench_gpu.py $smoke --threads "$threads" --parts weights \
    --networks light_vgg19 --json "$out/gpu-light-vgg19.json"
step bench-resnet50 150 "$py" benchmarks/bench_gpu.py $smoke --threads "$threads" --parts weights \
    --networks resnet50 --json "$out/gpu-resnet50.json"
if "$py" -c "import torch" >/dev/null 2>&1; then
    step bench-data 150 "$py" benchmarks/bench_gpu.py $smoke --threads "$threads" --parts data \
        --json "$out/gpu-data.json"
else
    say "bench-data: skipped (its baseline needs torch, which $py does not import)"
fi

for name in bench-vgg19 bench-light-vgg19 bench-resnet50 bench-data; do  # their tables, progress lines left out
    [ -f "$out/$name.log" ] && { echo "---- $name ----"; grep -v -E '^  [a-z_0-9]+: ' "$out/$name.log" | tail -30; } >>"$summary"
done
for name in tests bench-vgg19 bench-light-vgg19 bench-resnet50 bench-data; do
    [ -f "$out/$name.log" ] && grep -q Traceback "$out/$name.log" && say "$name: a traceback, see $name.log"
done
cat "$out/env.txt" "$summary"
