"""Identity-free routing: what a router or scheduler may look at to place a request.

The rule (non-targetability): a placement decision uses only what the request asks the engine to
compute and how loaded each replica is, never who sent it. No client address, API key, token,
user field, session or request id enters a decision, so an operator who controls one replica
cannot have a chosen user's requests steered to it. Prefix affinity is allowed because it keys on
salted block hashes: without a client's own secret salt, no two clients' hashes match.

The cluster layer's router (a later part) takes RoutingFeatures and nothing else; so does any
scheduling policy that orders requests. tests/test_privacy_gate.py checks the fields stay
non-identifying.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingFeatures:
    prompt_tokens: int
    max_tokens: int
    num_sequences: int  # n
    prefix_hashes: tuple[bytes, ...] = ()  # salted hashes of the prompt's full KV blocks, for affinity


# Names that would identify a client; a RoutingFeatures field with one of them fails the test.
IDENTIFYING = frozenset({"client", "address", "ip", "api_key", "key", "token", "user", "session", "request_id",
                         "origin", "cookie", "authorization", "cache_salt"})
