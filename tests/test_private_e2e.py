"""Private mode as an operator and a user run it, each part its own process on loopback: a signed,
logged manifest; `serve --private` requiring tokens; an issuer; a relay; and `chat --private`, which
verifies the node, gets a token and streams its answer through the relay."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from server_fixtures import free_port, tiny_model_path

LLMSERVE = [sys.executable, "-m", "llmserve.cli"]


def _start(args: list[str], url: str, log) -> subprocess.Popen:
    proc = subprocess.Popen(LLMSERVE + args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[0]} exited early")
        try:
            httpx.get(url, timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{args[0]} did not start")


def _run(args: list[str]) -> str:
    out = subprocess.run(LLMSERVE + args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_operator_and_user_end_to_end(tmp_path):
    model = str(tiny_model_path())
    _run(["manifest", "keygen", "--out", str(tmp_path / "keys")])
    _run(["manifest", "build", model, "--key", str(tmp_path / "keys" / "manifest-key.pem"),
          "--out", str(tmp_path / "release"), "--log", str(tmp_path / "log")])
    ports = {name: free_port() for name in ("serve", "issuer", "relay")}
    node = f"http://127.0.0.1:{ports['serve']}"
    procs = []
    with open(tmp_path / "processes.log", "w") as log:
        try:
            procs.append(_start(["issuer", "--key", str(tmp_path / "issuer.pem"), "--name", "test-issuer",
                                 "--port", str(ports["issuer"])],
                                f"http://127.0.0.1:{ports['issuer']}/.well-known/private-token-issuer-directory", log))
            procs.append(_start(["serve", model, "--private", "--port", str(ports["serve"]), "--num-kv-blocks", "128",
                                 "--manifest", str(tmp_path / "release"), "--transparency-log", str(tmp_path / "log"),
                                 "--token-issuer-key", str(tmp_path / "issuer.pub"),
                                 "--token-issuer-name", "test-issuer"], node + "/v1/privacy", log))
            procs.append(_start(["relay", "--gateway", node + "/.well-known/ohttp-gateway",
                                 "--port", str(ports["relay"])], f"http://127.0.0.1:{ports['relay']}/keys", log))
            out = _run(["chat", "Hello there", "--private", node, "--manifest-key",
                        str(tmp_path / "keys" / "manifest-key.pub"), "--log", str(tmp_path / "log"),
                        "--relay", f"http://127.0.0.1:{ports['relay']}/", "--issuer",
                        f"http://127.0.0.1:{ports['issuer']}", "--max-tokens", "5"])
            assert out.strip()  # the tiny model's words, streamed back through the relay
            assert httpx.post(node + "/v1/completions", json={"prompt": "x"}).status_code == 401
            # A user holding another operator's key refuses to talk to this node.
            _run(["manifest", "keygen", "--out", str(tmp_path / "other")])
            refused = subprocess.run(LLMSERVE + ["chat", "hi", "--private", node, "--manifest-key",
                                                 str(tmp_path / "other" / "manifest-key.pub"), "--log",
                                                 str(tmp_path / "log")], capture_output=True, text=True, timeout=300)
            assert refused.returncode != 0 and "signature does not verify" in refused.stderr
        finally:
            for proc in procs:
                os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=60)
    log_text = (tmp_path / "processes.log").read_text()
    assert "Hello there" not in log_text and "127.0.0.1:" not in log_text.replace(node, "")
