"""Request intake: a prompt (text or token ids) and its sampling checked into a new Sequence, and the output a
client already has (a migrated request) put back in front of what is still to come.  Bad input raises ValueError
naming the problem and changes nothing."""

from __future__ import annotations

from collections.abc import Container
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from disagg.engine.mm_inputs import ImageEmbedding, text_ids
from disagg.engine.sequence import Sequence
from disagg.engine.tokenizer import Tokenizer
from disagg.protocol import SamplingParams


@dataclass
class Intake:
    tokenizer: Tokenizer | None
    vocab_size: int
    max_model_len: int
    block_size: int
    hidden_size: int = 0  # an image's embedding rows are this wide

    def new_sequence(
        self,
        request_id: str,
        prompt: str | list[int],
        sampling: SamplingParams | dict | None,
        taken: Container[str] = (),
        images: Seq[ImageEmbedding] = (),
    ) -> Sequence:
        """A new sequence for a prompt (text or ids); ValueError names what is wrong.  `taken`: ids in use;
        `images`: the prompt's image spans (their positions hold placeholder ids above the vocabulary)."""
        if request_id in taken:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(sampling, dict):
            sampling = SamplingParams.from_dict(sampling)
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ValueError("sampling must be SamplingParams or a dict")
        token_ids = self.tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        text = text_ids(token_ids, images, self.vocab_size, self.hidden_size) if images else token_ids
        self.check_ids(text, "prompt")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; the context holds {self.max_model_len} "
                f"(prompt + at least one generated token)"
            )
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model directory has none")
        seq = Sequence(request_id, token_ids, sampling, self.block_size)
        seq.images = list(images)
        return seq

    def check_ids(self, token_ids: list[int], what: str) -> None:
        vocab = self.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"{what} token ids must be integers in [0, {vocab})")

    def resume(self, seq: Sequence, tokens: list[int], num_chars: int) -> None:
        """Continue after output a client already has: recompute it, rebuild its text, emit only what is new."""
        self.check_ids(tokens, "resumed")
        if len(tokens) >= seq.sampling.max_tokens or seq.num_prompt_tokens + len(tokens) >= self.max_model_len:
            raise ValueError("a resumed request must have room for at least one more token")
        for token in tokens:
            seq.token_ids.append(token)
            if self.tokenizer is not None:
                text, seq.prefix_offset, seq.read_offset = self.tokenizer.decode_incremental(
                    seq.token_ids, seq.prefix_offset, seq.read_offset
                )
                seq.text += text
        if not 0 <= num_chars <= len(seq.text):
            raise ValueError(f"resume_num_chars={num_chars} but the resumed tokens decode to {len(seq.text)}")
        seq.num_emitted_chars = num_chars

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt) if prompt else []
        if not isinstance(prompt, (list, tuple)):
            raise ValueError("prompt must be a string or a list of token ids")
        return list(prompt)
