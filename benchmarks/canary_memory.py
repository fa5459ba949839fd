"""How many copies of a request's text stay in the serving process's memory after the request ends.

    .venv/bin/python benchmarks/canary_memory.py [--requests 20]

Sends requests carrying unique canaries through the OpenAI-compatible app in-process (private mode
off, then on, each in a fresh subprocess), waits for them to end, collects garbage, then reads every
readable mapping of /proc/self/mem and counts the canaries still there. The canary's own search
needle is built from a prefix and a number at scan time, so the scanner adds no copies of whole
canaries. A copy left behind is text the process holds without need (freed Python strings whose
memory was not reused, tokenizer buffers, allocator free lists): the number bounds what a memory
dump after the request would show.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys

PREFIX = "qvzcanary"


def scan(prefix: bytes) -> dict[str, int]:
    """Occurrences of prefix + 4 digits in readable private memory, by canary."""
    pattern = re.compile(re.escape(prefix) + rb"\d{4}")
    found: dict[str, int] = {}
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for m in pattern.finditer(chunk):
                key = m.group().decode()
                found[key] = found.get(key, 0) + 1
    return found


def child(private: bool, requests: int) -> None:
    import asyncio

    import httpx

    from llmserve.config import EngineConfig
    from llmserve.engine.async_engine import AsyncLLMEngine
    from llmserve.server.app import ServerSettings, build_app

    config = EngineConfig(max_model_len=512, private=private)
    if private:
        from llmserve.privacy.threats import private_config
        config = private_config(config)
    engine = AsyncLLMEngine.from_config(config)
    app = build_app(engine, ServerSettings(private=private))

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
            for i in range(requests):
                body = {"messages": [{"role": "user", "content": f"Repeat after me: {PREFIX}{i:04d}"}],
                        "max_tokens": 16, "temperature": 0}
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()
    asyncio.run(run())
    gc.collect()
    found = scan(PREFIX.encode())
    engine.shutdown()
    print(json.dumps({"private": private, "requests": requests, "canaries_found": len(found),
                      "copies": sum(found.values())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--child", choices=["off", "on"], default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.child == "on", args.requests)
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--requests", str(args.requests)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
