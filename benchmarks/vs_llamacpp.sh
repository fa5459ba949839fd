#!/usr/bin/env bash
# llmserve vs llama.cpp on the embedded model's own GGUF file (SmolLM2-135M-Instruct, Q4_1), in one
# run, through the same client: `llmserve bench serve` loads `llama-server` and `llmserve serve`
# one after the other with the same prompts, arrivals and seed. llama-bench's own single-stream
# numbers are printed too.
#
#   benchmarks/vs_llamacpp.sh                          # single stream (W2) + 60 chat requests at once
#   benchmarks/vs_llamacpp.sh --concurrency 60 --num-prompts 120   # two waves
#   LLMSERVE_ARGS="--quantization none" benchmarks/vs_llamacpp.sh
#
# llama.cpp is built (CPU, -DGGML_NATIVE=ON) from the llama.cpp sources that PyPI's
# llama-cpp-python sdist vendors, into LLAMA_DIR (default bench-results/llamacpp, gitignored): a few
# minutes on first use. Results land in bench-results/vs_llamacpp/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LLAMA_DIR=${LLAMA_DIR:-bench-results/llamacpp}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
OUT=${OUT:-bench-results/vs_llamacpp}
THREADS=${THREADS:-$(nproc)}
CONCURRENCY=60
NUM_PROMPTS=60
W2_PROMPTS=8
PORT_LLAMA=8091
PORT_OURS=8092
while [ $# -gt 0 ]; do
    case "$1" in
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --num-prompts) NUM_PROMPTS=$2; shift 2 ;;
        --w2-prompts) W2_PROMPTS=$2; shift 2 ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done

SERVER="$LLAMA_DIR/build/bin/llama-server"
if [ ! -x "$SERVER" ]; then
    echo "building llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sources) into $LLAMA_DIR ..."
    mkdir -p "$LLAMA_DIR"
    "$PY" -m pip download -q "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" --no-binary :all: --no-deps -d "$LLAMA_DIR"
    tar xzf "$LLAMA_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$LLAMA_DIR"
    cmake -S "$LLAMA_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" -B "$LLAMA_DIR/build" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > "$LLAMA_DIR/cmake.log"
    cmake --build "$LLAMA_DIR/build" --target llama-server llama-bench -j "$(nproc)" > "$LLAMA_DIR/build.log"
fi

GGUF=$("$PY" -c "from llmserve.model.default_model import default_model_path; print(default_model_path())")
mkdir -p "$OUT"
echo "model: $GGUF"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc), threads $THREADS"

echo "== llama-bench (llama.cpp's own single-stream numbers: pp128 = prompt tok/s, tg128 = generated tok/s)"
"$LLAMA_DIR/build/bin/llama-bench" -m "$GGUF" -t "$THREADS" -p 128 -n 128 -r 3 | tee "$OUT/llama-bench.txt"

wait_ready() {  # url
    for _ in $(seq 1 300); do
        if curl -sf "$1" > /dev/null; then return 0; fi
        sleep 1
    done
    echo "server at $1 did not come up" >&2
    return 1
}

bench() {  # label port extra-args...
    local label=$1 port=$2
    shift 2
    "$PY" -m llmserve.cli bench serve --base-url "http://127.0.0.1:$port" --tokenizer "$GGUF" \
        --label "$label" --result-dir "$OUT" --disable-tqdm --no-plot "$@"
}

run_pair() {  # name client-args...
    local name=$1
    shift
    # llama.cpp: one slot per concurrent request, each with room for prompt + output.
    "$SERVER" -m "$GGUF" -t "$THREADS" --host 127.0.0.1 --port "$PORT_LLAMA" -np "$SLOTS" -c $((SLOTS * 2048)) \
        --no-webui > "$OUT/llama-server-$name.log" 2>&1 &
    local pid=$!
    wait_ready "http://127.0.0.1:$PORT_LLAMA/health"
    bench "llamacpp-$name" "$PORT_LLAMA" --output-json "$OUT/llamacpp-$name.json" "$@"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    # shellcheck disable=SC2086
    "$PY" -m llmserve.cli serve --host 127.0.0.1 --port "$PORT_OURS" --max-num-seqs "$SLOTS" ${LLMSERVE_ARGS:-} \
        > "$OUT/llmserve-$name.log" 2>&1 &
    pid=$!
    wait_ready "http://127.0.0.1:$PORT_OURS/ready"
    bench "llmserve-$name" "$PORT_OURS" --output-json "$OUT/llmserve-$name.json" "$@"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    "$PY" - "$OUT/llmserve-$name.json" "$OUT/llamacpp-$name.json" <<'EOF'
import json, sys
ours, theirs = (json.load(open(p)) for p in sys.argv[1:3])
def get(d, k):
    return d["runs"][0]["metrics"].get(k)
for key, better in (("request_throughput", "higher"), ("output_throughput", "higher"), ("mean_ttft_ms", "lower"),
                    ("p99_ttft_ms", "lower"), ("mean_tpot_ms", "lower"), ("p99_tpot_ms", "lower")):
    a, b = get(ours, key), get(theirs, key)
    if a and b:
        ratio = a / b if better == "higher" else b / a
        print(f"  {key:20s} llmserve {a:10.2f}  llama.cpp {b:10.2f}  llmserve advantage {ratio:5.2f}x")
EOF
}

echo "== W2: single stream, 128 prompt tokens -> 128 output tokens, served"
SLOTS=1 run_pair w2 --workload random --input-len 128 --output-len 128 --range-ratio 0 \
    --num-prompts "$W2_PROMPTS" --max-concurrency 1 --ignore-eos

echo "== serving: $CONCURRENCY chat-shaped requests at once ($NUM_PROMPTS in all)"
SLOTS=$CONCURRENCY run_pair chat --workload chat --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONCURRENCY" \
    --max-input-len 1024 --max-output-len 256 --ignore-eos
