"""Offline capacity planning: the cluster-spec grammar (`spec`), the simulator-driven search for the best
prefill:decode split for a workload and SLOs (`search`) and its command, `disagg plan` (`cli`).  The runtime
planner that moves workers while serving is disagg/planner/."""
