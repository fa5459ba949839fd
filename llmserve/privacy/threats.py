"""The threat gate: every optimization and setting the engine has, the Private Cloud Compute
requirements it puts at risk, and its state in private mode, decided here and nowhere else.

Threat letters (the seed survey's table): S stateless computation, E enforceable guarantees,
T non-targetability, P no privileged runtime access, V verifiable transparency.

Every EngineConfig field is either a gated setting (SETTINGS) or declared harmless (HARMLESS);
tests/test_privacy_gate.py fails when a field is neither, so a new optimization cannot arrive
without saying what it opens. `private_config` turns a config into its private form; `describe`
is what GET /v1/privacy lists.
"""
from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Any, Callable

from llmserve.config import EngineConfig
from llmserve.errors import InvalidRequestError


@dataclass(frozen=True)
class Gated:
    field: str  # the EngineConfig field that switches it
    threats: str  # letters of SETPV it opens when on in its open form
    opens: str  # how
    safe_form: str  # what private mode runs instead
    private: Callable[[Any], Any]  # its value in private mode, from the value asked for


def _refuse(field: str, allowed: Callable[[Any], bool], why: str) -> Callable[[Any], Any]:
    """A value private mode keeps only if it is safe; otherwise the start fails saying why."""
    def check(value: Any) -> Any:
        if not allowed(value):
            raise InvalidRequestError(f"--private refuses {field}={value!r}: {why}")
        return value
    return check


SETTINGS: tuple[Gated, ...] = (
    Gated("enable_prefix_caching", "S",
          "a request's prompt prefix stays cached after it ends, and a hit is visible in another "
          "user's time to first token (a timing side channel on other users' prompts)",
          "kept, but each request without its own secret cache_salt gets a fresh random one: "
          "a prefix is shared only by requests of one client that chose to share it",
          lambda v: v),
    Gated("wipe_kv_on_free", "S", "freed KV blocks keep the text's keys and values until reused",
          "forced on: blocks and state slots are zeroed when freed", lambda v: True),
    Gated("scheduling_policy", "T",
          "priorities and deadlines let a request be told apart and served differently from others",
          "fcfs only; a request that asks for a priority is served as any other",
          _refuse("scheduling_policy", lambda v: v == "fcfs", "priorities and deadlines make requests targetable")),
    Gated("ttft_slo", "T", "a deadline per request (with the deadline policy) singles requests out",
          "kept for the autoscaler, which reads only aggregate load; no request is scheduled by it (the "
          "deadline policy is refused)", lambda v: v),
    Gated("speculative_config", "S",
          "accepted drafts shorten steps when the text repeats itself: token timing then reveals "
          "what the output contains",
          "off", lambda v: None),
    Gated("router", "T",
          "where a request runs decides which operator's replica sees it: a placement keyed on who sent "
          "it would let one replica collect a chosen user's requests",
          "any router, all of them identity-free: they see only RoutingFeatures (privacy/routing.py)",
          lambda v: v),
    Gated("autoscale", "T",
          "machine-level scheduling: which replicas exist, and when, could be steered to gather chosen "
          "users' requests on one of them",
          "kept: decisions read aggregate counts only (queued prompt tokens, running requests, step times), "
          "and a new replica takes requests only through the identity-free router",
          lambda v: v),
    Gated("ray_address", "P",
          "joining an existing Ray cluster runs the engine among processes the node does not control, "
          "which can call into it",
          "refused: a private node starts its own loopback-only Ray",
          _refuse("ray_address", lambda v: v is None, "the node would join a cluster it does not control")),
    Gated("kv_offload_dir", "S",
          "evicted prefix KV written to disk outlives the request in files, where a cold-boot, backup or "
          "another process could read it",
          "encrypted: AES-256-GCM under a key drawn at start that exists only in the node's memory, "
          "the block hash as associated data; the files are removed at shutdown",
          lambda v: v),
    Gated("seed", "S",
          "a fixed engine seed makes unseeded sampling a function of the batch: one user's draws "
          "depend on what other users asked",
          "a fresh random engine seed at every start", lambda v: secrets.randbelow(2 ** 31)),
)

# Settings that open none of the five: how weights and KV are stored and computed, sizes, limits.
HARMLESS: frozenset[str] = frozenset({
    "model", "tokenizer", "dtype", "quantization", "activations", "kv_cache_dtype", "device",
    "max_model_len", "block_size", "num_kv_blocks", "kv_cache_memory", "max_num_seqs",
    "max_num_batched_tokens", "max_waiting_requests", "private", "replicas", "prefill_replicas", "decode_replicas",
    "share_weights",
    # A KV policy drops a request's own tokens' K/V, kept per request and shared with no one.
    "kv_policy", "kv_budget",
    "kv_offload_bytes",  # the tier's size; whether there is one, and how it is kept, is gated above
    # KV groups lay the cache out by layer kind; a block a window group gives back follows the
    # wipe and prefix rules of every freed block (gated above).
    "kv_groups",
    "tpot_slo", "upscale_delay_s", "downscale_delay_s",  # the autoscaler's targets and delays (gated above)
})


def gated_fields() -> set[str]:
    return {g.field for g in SETTINGS}


def unclassified_fields() -> set[str]:
    """EngineConfig fields the gate says nothing about (must be empty)."""
    return {f.name for f in dataclasses.fields(EngineConfig)} - gated_fields() - HARMLESS


def private_config(config: EngineConfig) -> EngineConfig:
    """The config private mode runs: every gated setting in its safe form (or a refusal)."""
    changes = {g.field: g.private(getattr(config, g.field)) for g in SETTINGS}
    return dataclasses.replace(config, **changes, private=True)


def describe(config: EngineConfig) -> list[dict[str, Any]]:
    """Every gated setting, its threats and its state, as GET /v1/privacy lists them."""
    return [{"optimization": g.field, "threats": list(g.threats), "opens": g.opens, "safe_form": g.safe_form,
             "state": _state(getattr(config, g.field))} for g in SETTINGS]


def _state(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__
