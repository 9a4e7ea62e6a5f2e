"""One inference engine: paged KV cache, prefix cache, continuous batching, chunked prefill."""
