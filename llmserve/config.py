"""EngineConfig: built once at start, frozen, passed down to every part."""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULING_POLICIES = ("fcfs", "priority", "deadline")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "int8", "bf16", "q4_1", "q8_0")  # None means "none"
ACTIVATIONS = ("float32", "q8")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None: the embedded default model
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    # Weight storage of the linear layers (CPU, float32 activations). "auto": a layer whose weights a
    # GGUF block format holds exactly (a GGUF model) keeps that format, the rest stay float; "none":
    # all float; "int8", "bf16", "q4_1", "q8_0": every layer in that format (lossy).
    quantization: str | None = "auto"
    # Activations of the GGUF Q4_1/Q8_0 layers (CPU). "float32": exact; "q8": quantized to 8 bits
    # per block of 32 with integer dot products, as llama.cpp computes them (faster, lossy). "q8"
    # needs GGUF layers to apply to: a start without any is an error, not a silent no-op.
    activations: str = "float32"
    # What the KV cache stores. "auto": the model's dtype (exact). "float16"/"bfloat16" under float32
    # compute: half the KV memory and the bytes a decode step reads; K/V are rounded when written
    # (lossy, as llama.cpp's default f16 cache), attention itself still computes in float32.
    kv_cache_dtype: str = "auto"
    # Layers of each kind in their own KV groups: sliding-window layers then hold their window per
    # request, not the whole context. False keeps every token for every layer (as vLLM's
    # --disable-hybrid-kv-cache-manager), e.g. to compare.
    kv_groups: bool = True
    device: str = "auto"  # auto: cuda if available, else cpu
    max_model_len: int | None = None  # None: the model's own context length
    block_size: int = 16
    num_kv_blocks: int | None = None  # exact number of KV blocks
    kv_cache_memory: int | None = None  # or a byte budget for the KV cache
    max_num_seqs: int = 256
    # The per-step token budget. None: 512 on CPU, where a 2048-token chunk is a ~3.5 s step that
    # every running decode waits for (512 cut p99 TPOT 3x with 60 chat requests, at equal
    # throughput), and 2048 on CUDA.
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    wipe_kv_on_free: bool = False
    ttft_slo: float | None = None  # seconds; under the "deadline" policy, a request's default TTFT deadline
    max_waiting_requests: int | None = None  # admission bound used by the server (429 beyond it)
    seed: int = 0
    # Private mode (privacy/threats.py decides what it changes; privacy/hardening.py hardens the
    # process). Set through privacy.threats.private_config, which also puts every gated
    # optimization in its safe form.
    private: bool = False
    # Replicas (cluster/): this many engines, each a Ray actor in its own process with its share of
    # the threads, behind one LLM / server; `router` places requests among them (cluster/router.py).
    replicas: int = 1
    router: str = "round_robin"
    ray_address: str | None = None  # join this Ray cluster instead of starting a local one
    # Prefill/decode disaggregation (DistServe): with both set, replicas = their sum; prompts are
    # computed on prefill replicas, whose requests then move with their KV to decode replicas.
    prefill_replicas: int = 0
    decode_replicas: int = 0
    # Replicas map one copy of the weights per host (Ray's object store) instead of loading their own.
    share_weights: bool = True
    # SLO-driven autoscaling (cluster/autoscaler.py): "min:max" replicas (parsed into a tuple),
    # against ttft_slo and tpot_slo (seconds). Starts at min; each replica gets the threads / max.
    autoscale: str | tuple[int, int] | None = None
    tpot_slo: float | None = None
    upscale_delay_s: float = 5.0  # predictions averaged over this long must miss an SLO to scale out
    downscale_delay_s: float = 30.0  # one replica fewer must hold both SLOs this long to scale in
    # Speculative decoding (vLLM's shape): a dict or JSON string, e.g. {"method": "ngram",
    # "num_speculative_tokens": 4}; validated into a spec.config.SpeculativeConfig. None: off.
    speculative_config: object = None
    # The KV policy of requests that name none (engine/kv_policy.py): "full" keeps every token's
    # K/V (exact); "streaming", "h2o", "keyformer" keep kv_budget tokens (a count, or a fraction
    # of each request's length) and evict the rest (lossy).
    kv_policy: str = "full"
    kv_budget: float | int | None = None
    # A disk tier under the prefix cache (engine/kv_offload.py): evicted prefix blocks are written
    # into a fresh subdirectory of this directory, at most kv_offload_bytes, and read back on a hit
    # instead of recomputed; removed at shutdown. None: off.
    kv_offload_dir: str | None = None
    kv_offload_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        from llmserve.errors import InvalidRequestError
        from llmserve.spec.config import SpeculativeConfig

        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))

        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {DTYPES}")
        if self.quantization not in (None,) + QUANTIZATIONS:
            raise InvalidRequestError(f"quantization must be one of {QUANTIZATIONS}")
        if self.activations not in ACTIVATIONS:
            raise InvalidRequestError(f"activations must be one of {ACTIVATIONS}, not {self.activations!r}")
        from llmserve.cluster.router import ROUTERS

        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise InvalidRequestError("replicas must be a positive integer")
        if (self.prefill_replicas > 0) != (self.decode_replicas > 0) or min(self.prefill_replicas,
                                                                           self.decode_replicas) < 0:
            raise InvalidRequestError("prefill_replicas and decode_replicas go together, both positive")
        if self.prefill_replicas:
            object.__setattr__(self, "replicas", self.prefill_replicas + self.decode_replicas)
        if self.autoscale is not None:
            object.__setattr__(self, "autoscale", _autoscale_bounds(self.autoscale))
            if self.ttft_slo is None or self.tpot_slo is None or min(self.ttft_slo, self.tpot_slo) <= 0:
                raise InvalidRequestError("autoscale needs positive ttft_slo and tpot_slo (seconds) to scale against")
            if self.prefill_replicas:
                raise InvalidRequestError("autoscale scales colocated replicas; it does not go with prefill/decode "
                                          "replicas")
            if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
                raise InvalidRequestError("upscale and downscale delays must be >= 0 seconds")
            object.__setattr__(self, "replicas", self.autoscale[0])
        if self.router not in ROUTERS:
            raise InvalidRequestError(f"router must be one of {ROUTERS}, not {self.router!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, not {self.kv_cache_dtype!r}")
        from llmserve.engine.kv_policy import validate as validate_kv_policy

        validate_kv_policy(self.kv_policy, self.kv_budget)
        if self.kv_policy != "full" and self.kv_budget is None:
            raise InvalidRequestError(f"kv_policy {self.kv_policy} needs a kv_budget")
        if not isinstance(self.kv_offload_bytes, int) or self.kv_offload_bytes < 1:
            raise InvalidRequestError("kv_offload_bytes must be a positive integer")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise InvalidRequestError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}")
        if self.block_size < 1 or self.max_num_seqs < 1 or (self.max_num_batched_tokens or 1) < 1:
            raise InvalidRequestError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidRequestError("num_kv_blocks must be positive")
        from llmserve.sampling_params import MAX_SEED, MIN_SEED, seed_in_range

        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not seed_in_range(self.seed)):
            raise InvalidRequestError(f"seed must be an integer in [{MIN_SEED}, {MAX_SEED}]")


def _autoscale_bounds(value) -> tuple[int, int]:
    """"min:max" (or a pair) as (min, max) replicas, 1 <= min <= max."""
    from llmserve.errors import InvalidRequestError

    try:
        low, high = (int(v) for v in (value.split(":") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise InvalidRequestError("autoscale must be MIN:MAX replicas, e.g. 1:4") from None
    if not 1 <= low <= high:
        raise InvalidRequestError("autoscale needs 1 <= MIN <= MAX replicas")
    return low, high
