"""Layout rules read from the import graph (tests/importgraph.py): the routing core knows nothing of Ray or HTTP,
the HTTP front door nothing of Ray, and the router, the planner and the front door depend on each other one way."""
import pytest

from tests.importgraph import cycles_in, graph, importers_of, package_cycles, package_edges, reachable, top_levels

FRONT = ["disagg.router", "disagg.planner", "disagg.http"]


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


@pytest.mark.parametrize("package", ["disagg.router", "disagg.http"])
def test_the_router_and_the_front_door_reach_no_ray(package):
    modules = [m for m in graph() if m == package or m.startswith(package + ".")]
    assert modules
    leaks = {m: sorted(dep for dep in reachable(m) if "ray" in top_levels(graph()[dep])) for m in modules}
    assert not any(leaks.values()), {m: d for m, d in leaks.items() if d}


def test_the_router_imports_nothing_from_the_front_door():
    routers = [m for m in graph() if m.startswith("disagg.router")]
    leaks = {m: sorted(d for d in reachable(m) if d.startswith("disagg.http")) for m in routers}
    assert not any(leaks.values()), {m: d for m, d in leaks.items() if d}
    web = {"fastapi", "starlette", "uvicorn"}
    served = {m: sorted(d for d in {m, *reachable(m)} if web & top_levels(graph()[d])) for m in routers}
    assert not any(served.values()), {m: d for m, d in served.items() if d}


def test_no_package_cycle_among_router_planner_and_front_door():
    assert package_cycles(FRONT) == []
    # the detector itself: the edges it sees are the intended ones (the planner depends on neither)
    edges = package_edges(FRONT)
    assert edges["disagg.planner"] == set() and "disagg.router" in edges["disagg.http"]
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles_in({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_module_cycle_in_the_router_the_planner_or_the_front_door():
    """RouterCore's collaborators (attempt.py, roles.py, the planner's port) get what they use, not the core: no
    module of these packages imports one that imports it back, even for type checking."""
    g = graph()
    mods = {m for m in g if m.startswith(tuple(FRONT))}
    module = lambda name: name if name in g else name.rpartition(".")[0]  # `from a import b`: b may be a name
    edges = {m: {module(i) for i in g[m]} & mods - {m} for m in mods}
    assert cycles_in(edges) == []
