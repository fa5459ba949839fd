"""A client of llmserve through Oblivious HTTP: requests are encapsulated for the gateway's pinned key
configuration and sent through a relay, which sees only ciphertext and the gateway only the relay.

    client = ObliviousClient(relay_url, ObliviousClient.fetch_keys(keys_url))
    status, headers, body = client.request("POST", "/v1/chat/completions", json_bytes)
    for piece in client.stream("POST", "/v1/chat/completions", json_bytes): ...   # SSE bytes
"""
from __future__ import annotations

from collections.abc import Iterator

import httpx

from llmserve.privacy import bhttp
from llmserve.privacy.ohttp import (
    CHUNKED_REQUEST_MEDIA_TYPE,
    REQUEST_MEDIA_TYPE,
    KeyConfig,
    OhttpError,
    encapsulate_chunked_request,
    encapsulate_request,
    parse_key_configs,
)


class ObliviousClient:
    def __init__(self, relay_url: str, key_config: KeyConfig, authority: str = "llmserve",
                 http: httpx.Client | None = None, timeout: float = 600.0) -> None:
        self.relay_url, self.key_config, self.authority = relay_url, key_config, authority
        self.http = http or httpx.Client(timeout=timeout)

    @staticmethod
    def fetch_keys(url: str, http: httpx.Client | None = None) -> KeyConfig:
        """The first configuration the gateway offers; pin it (compare it out of band) before use."""
        response = (http or httpx).get(url)
        response.raise_for_status()
        configs = parse_key_configs(response.content)
        if not configs:
            raise OhttpError("the gateway offers no key configuration")
        return configs[0]

    def _message(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        fields = [(k.lower(), v) for k, v in (headers or {}).items()]
        if body and "content-type" not in dict(fields):
            fields.append(("content-type", "application/json"))
        return bhttp.encode_request(bhttp.Request(method, "https", self.authority, path, fields, body))

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                ) -> tuple[int, list[tuple[str, str]], bytes]:
        enc, context = encapsulate_request(self.key_config, self._message(method, path, body, headers))
        outer = self.http.post(self.relay_url, content=enc, headers={"content-type": REQUEST_MEDIA_TYPE})
        if outer.status_code != 200:
            raise OhttpError(f"the relay or gateway refused the request ({outer.status_code})")
        answer = bhttp.decode_response(context.decapsulate(outer.content))
        return answer.status, answer.headers, answer.content

    def stream(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
               ) -> Iterator[tuple[int, list[tuple[str, str]]] | bytes]:
        """First (status, headers), then each piece of content as the gateway seals it."""
        enc, opener = encapsulate_chunked_request(self.key_config, [self._message(method, path, body, headers)])
        reader = _ResponseStream()
        with self.http.stream("POST", self.relay_url, content=enc,
                              headers={"content-type": CHUNKED_REQUEST_MEDIA_TYPE}) as outer:
            if outer.status_code != 200:
                raise OhttpError(f"the relay or gateway refused the request ({outer.status_code})")
            for data in outer.iter_bytes():
                for plain in opener.feed(data):
                    yield from reader.feed(plain)
            for plain in opener.feed(b"", end=True):
                yield from reader.feed(plain)
        if not reader.finished:
            raise OhttpError("the response ended early")


class _ResponseStream:
    """An indeterminate-length Binary HTTP response read as it arrives: head, then content chunks."""

    def __init__(self) -> None:
        self.buf, self.head_done, self.finished = b"", False, False

    def feed(self, data: bytes) -> Iterator[tuple[int, list[tuple[str, str]]] | bytes]:
        self.buf += data
        if not self.head_done:
            parsed = _head(self.buf)
            if parsed is None:
                return
            status, fields, used = parsed
            self.buf, self.head_done = self.buf[used:], True
            yield status, fields
        while self.buf and not self.finished:
            try:
                reader = bhttp._Reader(self.buf)
                n = reader.varint()
                if n == 0:
                    self.finished = True  # trailers and padding are not used by llmserve's answers
                    return
                piece = reader.take(n)
            except bhttp.BhttpError:
                return  # not all here yet
            self.buf = self.buf[reader.pos:]
            yield piece


def _head(buf: bytes) -> tuple[int, list[tuple[str, str]], int] | None:
    try:
        r = bhttp._Reader(buf)
        if r.varint() != 3:
            raise OhttpError("not a streamed binary HTTP response")
        status = r.varint()
        while 100 <= status <= 199:  # informational responses: skip their fields
            while r.varint() != 0:
                r.take(r.varint())
            status = r.varint()
        fields = []
        while (n := r.varint()) != 0:
            fields.append(bhttp._field(r.take(n), r.prefixed()))
        return status, fields, r.pos
    except bhttp.BhttpError as e:
        if "truncated" in str(e):
            return None
        raise OhttpError(f"malformed streamed response ({e})") from None
