"""Workloads: trace records and their scaling to the serving machine (`record`), hash_id -> token ids (`tokens`),
trace loaders (Mooncake JSONL, Azure, BurstGPT, generic CSV: `loaders`), generated multi-turn agent sessions
(`agent`), the command-line workload selection (`options`), and per-request metrics, goodput under SLOs and
reports (`metrics`, `report`, `plots`).  Shared by the simulator, the planner and the bench harness."""
