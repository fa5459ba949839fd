#!/usr/bin/env bash
# llmserve vs llama.cpp on the embedded model's own GGUF file (SmolLM2-135M-Instruct, Q4_1), in one
# run, through the same client: `llmserve bench serve` loads `llama-server` and `llmserve serve`
# one after the other with the same prompts, arrivals and seed. llama-bench's own single-stream
# numbers are printed too, and `llama-batched-bench` at W1's shape (64 sequences x 256 random prompt
# tokens -> 128 generated each, no HTTP: llama.cpp's own offline batched throughput).
#
#   benchmarks/vs_llamacpp.sh                          # llama-bench, W1 batched-bench, W2 served, 60 chat
#   benchmarks/vs_llamacpp.sh --only-batched-bench     # build if needed, then only the W1 batched-bench step
#   benchmarks/vs_llamacpp.sh --only-chat              # build if needed, then only the served chat pair
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
ONLY_BATCHED=0
ONLY_CHAT=0
PORT_LLAMA=8091
PORT_OURS=8092
while [ $# -gt 0 ]; do
    case "$1" in
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --num-prompts) NUM_PROMPTS=$2; shift 2 ;;
        --w2-prompts) W2_PROMPTS=$2; shift 2 ;;
        --only-batched-bench) ONLY_BATCHED=1; shift ;;
        --only-chat) ONLY_CHAT=1; shift ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done

SERVER="$LLAMA_DIR/build/bin/llama-server"
BATCHED="$LLAMA_DIR/build/bin/llama-batched-bench"
if [ ! -x "$SERVER" ] || [ ! -x "$BATCHED" ]; then
    echo "building llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sources) into $LLAMA_DIR ..."
    mkdir -p "$LLAMA_DIR"
    [ -f "$LLAMA_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" ] || \
    "$PY" -m pip download -q "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" --no-binary :all: --no-deps -d "$LLAMA_DIR"
    tar xzf "$LLAMA_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$LLAMA_DIR"
    cmake -S "$LLAMA_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" -B "$LLAMA_DIR/build" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > "$LLAMA_DIR/cmake.log"
    cmake --build "$LLAMA_DIR/build" --target llama-server llama-bench llama-batched-bench -j "$(nproc)" > "$LLAMA_DIR/build.log"
fi

GGUF=$("$PY" -c "from llmserve.model.default_model import default_model_path; print(default_model_path())")
mkdir -p "$OUT"
echo "model: $GGUF"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc), threads $THREADS"

# W1's shape through llama.cpp's own batched decoding, no HTTP: 64 sequences, each its own 256 random
# prompt tokens (not shared), then 128 generated tokens each, all 64 decoded together. The KV cache
# must hold 64 x (256 + 128) = 24576 tokens. Default batch sizes (-b 2048, -ub 512) and flash
# attention setting (auto), as llama.cpp ships them. output_tokens_per_second = 64 x 128 / T (prompt
# processing included), the number comparable to W1's offline output tok/s.
batched_bench_w1() {
    local npl=${BATCHED_NPL:-64} npp=${BATCHED_NPP:-256} ntg=${BATCHED_NTG:-128}  # W1 unless overridden (smoke tests)
    local cmd=("$BATCHED" -m "$GGUF" -t "$THREADS" -tb "$THREADS" -c $((npl * (npp + ntg))) -npp "$npp" -ntg "$ntg"
               -npl "$npl" --output-format jsonl)
    echo "== W1 through llama-batched-bench: $npl sequences x $npp prompt tokens -> $ntg each, $THREADS threads"
    echo "\$ ${cmd[*]}   (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
    "${cmd[@]}" > "$OUT/llama-batched-bench-w1.jsonl" 2> "$OUT/llama-batched-bench-w1.log"
    "$PY" - "$OUT/llama-batched-bench-w1.jsonl" "$OUT/llama-batched-bench-w1.json" "$GGUF" "$THREADS" \
        "${cmd[*]}" <<'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
if not rows:
    sys.exit("llama-batched-bench printed no result line; see its log")
r = rows[-1]
out_tok = r["pl"] * r["tg"]
res = {"tool": "llama-batched-bench", "model": sys.argv[3], "threads": int(sys.argv[4]), "command": sys.argv[5],
       "load_average_after": os.getloadavg(), "raw": r,
       "workload": {"sequences": r["pl"], "prompt_tokens_each": r["pp"], "output_tokens_each": r["tg"]},
       "prompt_tokens_per_second": r["speed_pp"], "decode_tokens_per_second": r["speed_tg"],
       "elapsed_time": r["t"], "output_tokens_per_second": out_tok / r["t"],
       "total_tokens_per_second": r["speed"]}
json.dump(res, open(sys.argv[2], "w"), indent=1)
print(f"  llama-batched-bench W1: prompt {r['speed_pp']:.1f} tok/s ({r['t_pp']:.1f} s), decode {r['speed_tg']:.1f} tok/s "
      f"({r['t_tg']:.1f} s); output tok/s over the whole run {out_tok / r['t']:.2f} ({r['t']:.1f} s)")
print(f"  wrote {sys.argv[2]}")
EOF
}

if [ "$ONLY_BATCHED" = 1 ]; then
    batched_bench_w1
    exit 0
fi

if [ "$ONLY_CHAT" = 0 ]; then
    echo "== llama-bench (llama.cpp's own single-stream numbers: pp128 = prompt tok/s, tg128 = generated tok/s)"
    "$LLAMA_DIR/build/bin/llama-bench" -m "$GGUF" -t "$THREADS" -p 128 -n 128 -r 3 | tee "$OUT/llama-bench.txt"
    batched_bench_w1
fi

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

if [ "$ONLY_CHAT" = 0 ]; then
    echo "== W2: single stream, 128 prompt tokens -> 128 output tokens, served"
    SLOTS=1 run_pair w2 --workload random --input-len 128 --output-len 128 --range-ratio 0 \
        --num-prompts "$W2_PROMPTS" --max-concurrency 1 --ignore-eos
fi

echo "== serving: $CONCURRENCY chat-shaped requests at once ($NUM_PROMPTS in all)"
SLOTS=$CONCURRENCY run_pair chat --workload chat --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONCURRENCY" \
    --max-input-len 1024 --max-output-len 256 --ignore-eos
