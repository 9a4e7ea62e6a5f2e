"""The HTTP front door: the OpenAI-compatible API, probes, /metrics and operator endpoints over the routing core
(disagg/router/), served by uvicorn.  No Ray here; the router imports nothing from this package."""
