"""Engine logprobs (per position: token id -> (logprob, rank)) in OpenAI's two formats."""
from __future__ import annotations

from llmserve.outputs import PositionLogprobs
from llmserve.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

MIN_LOGPROB = -9999.0  # -inf is not JSON


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens at a position, most likely first."""
    ranked = sorted((rank, tid, lp) for tid, (lp, rank) in position.items() if rank <= k)
    return [(tid, _clamp(lp)) for _, tid, lp in ranked[:k]]


def _clamp(lp: float) -> float:
    return max(lp, MIN_LOGPROB)


def completion_logprobs(tokenizer, token_ids: list[int], positions: list[PositionLogprobs | None], k: int,
                        text_offset: int = 0) -> CompletionLogprobs:
    """Legacy format: parallel lists of tokens, their logprobs, top-k dicts and text offsets. A None
    position (the first prompt token, echoed: nothing predicts it) has None logprobs, as in OpenAI."""
    out = CompletionLogprobs()
    offset = text_offset
    for tid, position in zip(token_ids, positions):
        token = tokenizer.decode([tid])
        out.tokens.append(token)
        if position is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(offset)
            offset += len(token)
            continue
        out.token_logprobs.append(_clamp(position[tid][0]))
        top: dict[str, float] = {}
        for t, lp in _top(position, k):
            top.setdefault(tokenizer.decode([t]), lp)  # tokens that decode alike: the likeliest speaks
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(tokenizer, token_ids: list[int], positions: list[PositionLogprobs], k: int) -> ChatLogprobs:
    content = []
    for tid, position in zip(token_ids, positions):
        token = tokenizer.decode([tid])
        top = [_entry(tokenizer.decode([t]), lp) for t, lp in _top(position, k)]
        content.append(TokenLogprob(token=token, logprob=_clamp(position[tid][0]), bytes=list(token.encode()),
                                    top_logprobs=top))
    return ChatLogprobs(content=content)


def _entry(token: str, lp: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=lp, bytes=list(token.encode()))
