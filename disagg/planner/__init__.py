"""The planner: picks roles for workers from the router's own measurements (policy.py, pure) and moves them at
runtime (loop.py) through a narrow port (port.py: the signals it reads, a role change) that the router implements
(router/planner_port.py) and the simulator too; the planner imports neither."""
