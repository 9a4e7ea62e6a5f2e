"""The routing core: prefix index, cost policy, exact load accounting, admission, worker health, role changes,
and RouterCore serving a request through its workers.  No Ray, no HTTP (disagg/http/ is the front door)."""
