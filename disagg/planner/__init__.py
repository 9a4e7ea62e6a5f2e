"""The planner: picks roles for workers from the router's own measurements (policy.py, pure) and moves them at
runtime through the router's role changer (loop.py)."""
