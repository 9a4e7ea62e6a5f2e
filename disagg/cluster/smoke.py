"""`disagg serve --smoke-test`: one real chat request through the official OpenAI client, its answer printed."""

from __future__ import annotations

import time


def smoke_test(url: str, model: str, api_key: str | None, question: str) -> None:
    """Send one real chat request through the official OpenAI client and print the answer."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "none")
    t0 = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0
    )
    elapsed = time.perf_counter() - t0
    if reply.usage is None:
        raise RuntimeError("the endpoint answered without usage")
    n = reply.usage.completion_tokens
    print(
        f">>> {question}\n{reply.choices[0].message.content}\n"
        f"[{n} tokens in {elapsed:.2f}s = {n / elapsed:.1f} tokens/s, finish={reply.choices[0].finish_reason}]"
    )
