"""Log hygiene: one structured line per finished request (counts and timings only), and an
access-log filter that keeps URLs out of the log unless they are one of the server's own routes
(a query string or an unknown path is client text, and could be content)."""
from __future__ import annotations

import json
import logging

from llmserve.server.metrics import FinishedRequest

request_logger = logging.getLogger("llmserve.server.requests")


def log_finished(r: FinishedRequest) -> None:
    if not request_logger.isEnabledFor(logging.INFO):
        return
    line = {
        "event": "request_finished", "request_id": r.request_id, "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens, "cached_tokens": r.cached_tokens, "n": len(r.finish_reasons),
        "queue_s": _round(r.queue_s), "ttft_s": _round(r.ttft_s), "e2e_s": _round(r.e2e_s),
        "finish_reason": ",".join(sorted(set(r.finish_reasons))),
    }
    if r.draft_tokens:  # speculative decoding: counts only
        line.update(draft_tokens=r.draft_tokens, accepted_tokens=r.accepted_tokens)
    request_logger.info(json.dumps(line))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


class AccessLogFilter(logging.Filter):
    """uvicorn's access records are (client, method, path?query, http version, status)."""

    def __init__(self, known_paths: set[str]) -> None:
        super().__init__()
        self.known_paths = known_paths

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path = args[2].split("?", 1)[0]
            record.args = (args[0], args[1], path if path in self.known_paths else "<other>", args[3], args[4])
        return True


def install_access_log_filter(known_paths: set[str]) -> None:
    access = logging.getLogger("uvicorn.access")
    for f in access.filters:
        if isinstance(f, AccessLogFilter):
            f.known_paths |= known_paths
            return
    access.addFilter(AccessLogFilter(set(known_paths)))
