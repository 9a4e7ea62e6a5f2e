"""KV-aware routing: prefix index, cost policy, router core, and the OpenAI-compatible HTTP API."""
