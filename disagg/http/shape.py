"""The shape of an answer: OpenAI choice objects for chat and completions, with logprobs and tool calls.

One `AnswerShape` per request turns the engine's TokenDeltas into choices - all at once for a JSON answer
(`final_choice`), or delta by delta for SSE (`stream_choice` then `stream_end`).  Logprob entries come from the
sampler (`[token, logprob, [[id, logprob], ...]]`); their token strings are decoded here, where the tokenizer is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from disagg.engine.tokenizer import Tokenizer
from disagg.http.tools import ToolCall, ToolCallStream, parse_tool_calls
from disagg.protocol import TokenDelta

TOOL_CALLS = "tool_calls"  # the finish reason of an answer that is tool calls


@dataclass
class Collected:
    """A whole (non-streamed) answer."""

    text: str = ""
    num_tokens: int = 0
    finish_reason: str = "stop"
    num_cached_tokens: int = 0
    logprobs: list[list] = field(default_factory=list)
    num_proposed_tokens: int = 0  # speculative decoding (cumulative on every delta: the last one counts)
    num_accepted_tokens: int = 0
    matched_stop: str | None = None

    def add(self, delta: TokenDelta) -> None:
        self.matched_stop = delta.matched_stop or self.matched_stop
        self.num_proposed_tokens = max(self.num_proposed_tokens, delta.num_proposed_tokens)
        self.num_accepted_tokens = max(self.num_accepted_tokens, delta.num_accepted_tokens)
        self.text += delta.text
        self.num_tokens += len(delta.token_ids)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.logprobs.extend(delta.logprobs or ())


class AnswerShape:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat: bool,
        logprobs: bool = False,
        tools: set[str] | None = None,
        parallel_tool_calls: bool = True,
    ) -> None:
        self.tokenizer, self.chat, self.logprobs = tokenizer, chat, logprobs
        self.tools, self.parallel = tools, parallel_tool_calls
        self._stream = ToolCallStream(tools, parallel_tool_calls) if tools else None
        self.call_seed: str | None = None  # the request id its tool calls' ids derive from (`name_calls`)
        self._text_offset = 0  # completions: where the next token starts in the answer's text
        self._strings: dict[int, str] = {}

    # ------------------------------------------------------------------ logprobs
    def _token(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            s = self._strings[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    def _chat_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        s = self._token(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    def logprobs_json(self, entries: list[list]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {
                "content": [
                    {**self._chat_entry(t, lp), "top_logprobs": [self._chat_entry(i, v) for i, v in top]}
                    for t, lp, top in entries
                ],
                "refusal": None,
            }
        tokens, offsets = [], []
        for t, _, _ in entries:
            tokens.append(self._token(t))
            offsets.append(self._text_offset)
            self._text_offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{self._token(i): v for i, v in top} for _, _, top in entries],
            "text_offset": offsets,
        }

    # ------------------------------------------------------------------ one JSON answer
    def final_choice(self, answer: Collected) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": answer.finish_reason,
            "logprobs": self.logprobs_json(answer.logprobs),
        }
        if not self.chat:
            choice["text"] = answer.text
            return choice
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        parsed = parse_tool_calls(answer.text, self.tools) if self.tools else None
        if parsed is not None:
            content, calls = parsed
            calls = self._named(calls if self.parallel else calls[:1])
            message = {"role": "assistant", "content": content or None, "tool_calls": [c.to_openai() for c in calls]}
            choice["finish_reason"] = TOOL_CALLS
        choice["message"] = message
        return choice

    def name_calls(self, request_id: str) -> None:
        """Tool call ids from the request's id (`call_<digest>_<n>`), not random: a resumed stream, which shapes the
        answer again (http/resume.py), names each call as the first connection did."""
        self.call_seed = request_id

    def _named(self, calls: list[ToolCall]) -> list[ToolCall]:
        if self.call_seed is not None:
            digest = hashlib.blake2b(self.call_seed.encode(), digest_size=8).hexdigest()
            for n, call in enumerate(calls):
                call.id = f"call_{digest}_{n}"
        return calls

    # ------------------------------------------------------------------ SSE
    def replay(self, delta: TokenDelta) -> None:
        """Take a delta the client already has (a resumed stream, http/resume.py) as if it was sent, so what follows
        is shaped exactly as it would have been.  The output an earlier worker produced (a migrated request) comes
        without logprob entries, yet its tokens still take their text offsets."""
        if self.logprobs and not self.chat and not delta.logprobs:
            self._text_offset += sum(len(self._token(t)) for t in delta.token_ids)
        self.stream_choice(delta)

    def stream_choice(self, delta: TokenDelta) -> dict[str, Any] | None:
        """The choice of one chunk for `delta`, or None when it carries nothing to send yet."""
        logprobs = self.logprobs_json(delta.logprobs or []) if delta.logprobs else None
        text = self._stream.feed(delta.text) if self._stream is not None else delta.text
        reason: str | None = delta.finish_reason
        calls: list[ToolCall] = []
        if reason and self._stream is not None:
            rest, calls = self._stream.finish()
            calls = self._named(calls)
            text += rest
            reason = TOOL_CALLS if calls else reason
        if not (text or reason or logprobs):
            return None
        if not self.chat:
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": logprobs}
        body: dict[str, Any] = {"content": text} if text else {}
        if calls:
            body["tool_calls"] = [c.to_openai(index=i) for i, c in enumerate(calls)]
        choice: dict[str, Any] = {"index": 0, "delta": body, "finish_reason": reason}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return choice
