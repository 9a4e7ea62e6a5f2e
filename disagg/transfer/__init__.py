"""Moving KV blocks between workers: the KVTransport interface and its NIXL implementation."""
