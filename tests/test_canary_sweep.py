"""A canary sweep of a private node: requests carry unique canaries (in prompts, stop strings,
refused requests, over-long prompts, malformed JSON) under concurrent load; afterwards no canary is
in a log line, the /metrics output, a file under the cache and temp directories, or the KV cache.
(How many copies stay in the process's own memory is measured by benchmarks/canary_memory.py.)"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from llmserve.config import EngineConfig
from llmserve.privacy.threats import private_config
from server_fixtures import start_private_server, tiny_model_path

CANARY = "zqxcanary"


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def private_server():
    config = private_config(EngineConfig(model=str(tiny_model_path()), num_kv_blocks=96, max_num_batched_tokens=64,
                                         max_model_len=256))
    url, engine, _, _, stop = start_private_server(config, log_level="info")
    yield url, engine
    stop()


def _requests(url: str, i: int) -> list[httpx.Response]:
    c = f"{CANARY}{i:03d}"
    post = lambda path, **kw: httpx.post(url + path, timeout=60, **kw)  # noqa: E731
    return [
        post("/v1/completions", json={"model": "tiny", "prompt": f"Tell me about {c}", "max_tokens": 4}),
        post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4, "stop": [c]}),
        post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": c}],
                                           "max_tokens": 3, "stream": True}),
        post("/v1/completions", json={"model": "tiny", "prompt": c, "max_tokens": -5}),  # refused: a 400
        post("/v1/completions", json={"model": "tiny", "prompt": (c + " ") * 300, "max_tokens": 2}),  # too long
        post("/v1/completions", content=f'{{"prompt": "{c}", '.encode(), headers={"content-type": "application/json"}),
        post("/v1/completions", json={"model": "tiny", "prompt": c, "x_unknown": c}),  # an unknown field
    ]


def test_no_canary_survives_anywhere(private_server):
    url, engine = private_server
    handler = Collect()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(args)s"))
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    for logger in loggers:
        logger.addHandler(handler)
    ours = logging.getLogger("llmserve")
    level, ours.level = ours.level, logging.DEBUG  # everything llmserve would ever log, not just warnings
    start = time.time()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = [r for batch in pool.map(lambda i: _requests(url, i), range(12)) for r in batch]
        time.sleep(0.5)  # let the engine finish and free every request
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        ours.setLevel(level)
    assert {r.status_code for r in results} >= {200, 400}
    assert all(r.status_code < 500 for r in results)
    assert handler.lines  # the server did log (request lines), just nothing of the content
    assert not [line for line in handler.lines if CANARY in line]
    for r in results:  # an error body names a field at most, never a value the client sent
        if r.status_code >= 400:
            assert CANARY not in r.text
    assert CANARY not in httpx.get(url + "/metrics").text
    assert not list(_files_with(CANARY.encode(), since=start))
    # Every request has ended: with no salt, each freed block was zeroed.
    caches = engine.engine.runner.kv_caches
    assert engine.engine.kv.usage == 0.0
    assert all(not t.any() for layer in caches for t in layer)


def _files_with(needle: bytes, since: float):
    roots = {Path(tempfile.gettempdir()), Path.home() / ".cache" / "llmserve"}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                    if st.st_mtime < since or st.st_size > 64 << 20 or not path.is_file():
                        continue
                    if needle in path.read_bytes():
                        yield path
                except OSError:
                    continue
