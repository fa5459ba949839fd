"""Binary HTTP messages (RFC 9292): the plaintext inside Oblivious HTTP.

Known-length (framing 0 request, 1 response) and indeterminate-length (2, 3) forms, informational
responses, trailers, truncation of empty trailing sections and zero padding, decoded strictly: a
message that breaks the format raises BhttpError (the gateway answers 400), it is never repaired.
Field values are kept as latin-1 strings, so any octet survives a round trip.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_FIELDS = 256


class BhttpError(ValueError):
    """Not a valid binary HTTP message (the message says why; never the content)."""


def encode_varint(v: int) -> bytes:
    """A QUIC variable-length integer (RFC 9000, section 16), in its shortest form."""
    if v < 0:
        raise BhttpError("negative integer")
    for prefix, size in ((0, 1), (1, 2), (2, 4), (3, 8)):
        if v < 1 << (8 * size - 2):
            return ((prefix << (8 * size - 2)) | v).to_bytes(size, "big")
    raise BhttpError("integer too large for a variable-length encoding")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def varint(self) -> int:
        if self.at_end():
            raise BhttpError("truncated message")
        size = 1 << (self.data[self.pos] >> 6)
        if self.pos + size > len(self.data):
            raise BhttpError("truncated message")
        v = int.from_bytes(self.data[self.pos:self.pos + size], "big") & ((1 << (8 * size - 2)) - 1)
        self.pos += size
        return v

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BhttpError("truncated message")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def prefixed(self) -> bytes:
        return self.take(self.varint())


@dataclass
class Request:
    method: str = "GET"
    scheme: str = "https"
    authority: str = ""
    path: str = "/"
    headers: list[tuple[str, str]] = field(default_factory=list)
    content: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


@dataclass
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    content: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    informational: list[tuple[int, list[tuple[str, str]]]] = field(default_factory=list)


def _lp(b: bytes) -> bytes:
    return encode_varint(len(b)) + b


def _field_lines(fields: list[tuple[str, str]]) -> bytes:
    return b"".join(_lp(n.encode("latin-1")) + _lp(v.encode("latin-1")) for n, v in fields)


def _section(fields: list[tuple[str, str]], indeterminate: bool) -> bytes:
    lines = _field_lines(fields)
    return lines + b"\x00" if indeterminate else _lp(lines)


def _content(content: bytes, indeterminate: bool) -> bytes:
    if indeterminate:
        return (_lp(content) if content else b"") + b"\x00"
    return _lp(content)


def encode_request(req: Request, indeterminate: bool = False, padding: int = 0) -> bytes:
    control = b"".join(_lp(s.encode("latin-1")) for s in (req.method, req.scheme, req.authority, req.path))
    return (encode_varint(2 if indeterminate else 0) + control + _section(req.headers, indeterminate)
            + _content(req.content, indeterminate) + _section(req.trailers, indeterminate) + b"\x00" * padding)


def encode_response(resp: Response, indeterminate: bool = False, padding: int = 0) -> bytes:
    out = encode_varint(3 if indeterminate else 1)
    for status, fields in resp.informational:
        out += encode_varint(status) + _section(fields, indeterminate)
    return (out + encode_varint(resp.status) + _section(resp.headers, indeterminate)
            + _content(resp.content, indeterminate) + _section(resp.trailers, indeterminate) + b"\x00" * padding)


def _read_fields(r: _Reader, indeterminate: bool) -> list[tuple[str, str]]:
    if r.at_end():  # truncated: this and every later section empty
        return []
    fields = []
    if indeterminate:
        while (n := r.varint()) != 0:
            fields.append(_field(r.take(n), r.prefixed()))
            if len(fields) > MAX_FIELDS:
                raise BhttpError("too many fields")
        return fields
    inner = _Reader(r.prefixed())
    while not inner.at_end():
        fields.append(_field(inner.prefixed(), inner.prefixed()))
        if len(fields) > MAX_FIELDS:
            raise BhttpError("too many fields")
    return fields


def _field(name: bytes, value: bytes) -> tuple[str, str]:
    if not name or name.startswith(b":") or name.lower() != name or any(c <= 0x20 or c >= 0x7F for c in name):
        raise BhttpError("invalid field name")
    if any(c in b"\r\n\x00" for c in value):
        raise BhttpError("invalid field value")
    return name.decode("latin-1"), value.decode("latin-1")


def _read_content(r: _Reader, indeterminate: bool) -> bytes:
    if r.at_end():
        return b""
    if not indeterminate:
        return r.prefixed()
    chunks = []
    while (n := r.varint()) != 0:
        chunks.append(r.take(n))
    return b"".join(chunks)


def _read_sections(r: _Reader, indeterminate: bool, message):
    """Header fields, content, trailer fields and zero padding, into a Request or Response."""
    message.headers = _read_fields(r, indeterminate)
    message.content = _read_content(r, indeterminate)
    message.trailers = _read_fields(r, indeterminate)
    if any(r.data[r.pos:]):
        raise BhttpError("padding is not zero")
    return message


def decode_request(data: bytes) -> Request:
    r = _Reader(data)
    framing = r.varint()
    if framing not in (0, 2):
        raise BhttpError("not a binary HTTP request")
    ind = framing == 2
    method, scheme, authority, path = (r.prefixed().decode("latin-1") for _ in range(4))
    if not method or not method.isascii() or any(c in method for c in " \t\r\n"):
        raise BhttpError("invalid method")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in path):
        raise BhttpError("invalid path")
    return _read_sections(r, ind, Request(method, scheme, authority, path))


def decode_response(data: bytes) -> Response:
    r = _Reader(data)
    framing = r.varint()
    if framing not in (1, 3):
        raise BhttpError("not a binary HTTP response")
    ind = framing == 3
    resp = Response()
    while True:
        status = r.varint()
        if 100 <= status <= 199:
            resp.informational.append((status, _read_fields(r, ind)))
            continue
        if not 200 <= status <= 599:
            raise BhttpError("invalid status code")
        resp.status = status
        break
    return _read_sections(r, ind, resp)
