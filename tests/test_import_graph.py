"""Layout rules read from the import graph (tests/importgraph.py): the routing core knows nothing of Ray."""
from tests.importgraph import graph, importers_of, reachable, top_levels


def test_the_graph_sees_imports_at_any_depth():
    # the detector itself: the Ray shell imports ray, the router core imports its own package's modules
    assert "ray" in top_levels(graph()["disagg.cluster.actors"])
    assert "disagg.router.health" in reachable("disagg.router.router")
    assert importers_of("ray", "disagg.cluster")


def test_the_router_imports_no_ray_directly_or_through_other_modules():
    assert importers_of("ray", "disagg.router") == {}
    routers = [m for m in graph() if m == "disagg.router" or m.startswith("disagg.router.")]
    assert routers
    leaks = {
        m: sorted(dep for dep in reachable(m) if "ray" in top_levels(graph()[dep]))
        for m in routers
    }
    assert not any(leaks.values()), {m: d for m, d in leaks.items() if d}
