"""The virtual-time simulator: simulated workers run the real engine bookkeeping (block pool, scheduler, KV
connector, KV events, KV handoff) with the model forward replaced by a calibrated step-time model (`SimRunner`),
in front of the real router core, admission and planner, so a 16-256 worker cluster runs on one CPU.

`run` replays a workload through it and reports like a real run (`disagg bench simulate`); `cluster` is the
cluster and its event loop; `runner` / `timemodel` the model stand-in and its step times; `tiers`, `admission`,
`planner`, `faults` and `cores` model the CPU/disk KV tiers, the router's admission queue, the planner's moves,
worker deaths and workers sharing cores.  No Ray, no HTTP, no device code."""
