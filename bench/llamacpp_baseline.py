"""llama.cpp (llama-cpp-python) on the same GGUF and prompts: the batch-1 baseline of bench/quantization.py.

Runs inside a separate virtualenv with llama-cpp-python (built from source by pip).  It loads the GGUF once, then
serves runs on demand so the caller can interleave them with its own: each stdin line is a JSON list of token-id
prompts, run one after another (llama.cpp's Python API decodes one sequence), greedy, `max_tokens` each with EOS
ignored, the prompt cache cleared first (a 4th argument `lookup` turns on llama-cpp-python's prompt-lookup
speculative decoding, `LlamaPromptLookupDecoding` with its defaults); each answer a line
`LLAMACPP_RESULT {"output_tok_s", "wall_s", "token_ids"}`.  Set up once (the version and build that worked are in
docs/benchmarks.md):

    python3 -m venv /tmp/llamaenv && /tmp/llamaenv/bin/pip install llama-cpp-python==0.3.36
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    gguf, max_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    lookup = len(sys.argv) > 4 and sys.argv[4] == "lookup"  # llama.cpp's own prompt-lookup speculation
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding() if lookup else None  # its defaults: what a user gets
    llm = Llama(
        model_path=gguf,
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
        seed=0,
        draft_model=draft,
    )

    def run(prompt: list[int]) -> list[int]:
        out: list[int] = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == max_tokens:
                break
        return out

    run([1, 2, 3, 4])  # warm-up
    print("LLAMACPP_READY", flush=True)
    for line in sys.stdin:
        prompts = json.loads(line)
        t0 = time.perf_counter()
        outputs = [run(p) for p in prompts]
        elapsed = time.perf_counter() - t0
        result = {"output_tok_s": sum(map(len, outputs)) / elapsed, "wall_s": elapsed, "token_ids": outputs}
        print("LLAMACPP_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
