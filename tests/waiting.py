"""Waiting on conditions, never on sleeps: the tests' one way to wait for a cluster to reach a state."""
import time

import ray


def wait_for(predicate, timeout_s=60.0, every_s=0.1):
    """The predicate's first truthy value; AssertionError when it has given none within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError("condition not met in time")


def actor_gone(name):
    """No actor of this name in the cluster (ended for good)."""
    try:
        ray.get_actor(name)
        return False
    except ValueError:
        return True
