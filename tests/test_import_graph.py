"""Layout rules read from the import graph (tests/importgraph.py): the routing core knows nothing of Ray or HTTP,
the HTTP front door nothing of Ray, and the router, the planner and the front door depend on each other one way;
the product (disagg/) never imports the bench lab (bench/); the simulator, planning and workloads reach no Ray and
no HTTP stack; no package of disagg/ is part of an import cycle."""
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
    leaks = {m: sorted(dep for dep in reachable(m) if "ray" in top_levels(graph()[dep])) for m in routers}
    assert not any(leaks.values()), {m: d for m, d in leaks.items() if d}


def _imports_under(prefix: str, package: str) -> dict[str, set[str]]:
    """Modules under `prefix` that import something under `package`: module -> those imports."""
    hits = {
        mod: {i for i in imports if i == package or i.startswith(package + ".")}
        for mod, imports in graph().items()
        if mod == prefix or mod.startswith(prefix + ".")
    }
    return {mod: found for mod, found in hits.items() if found}


def test_kv_uses_the_transport_it_is_given_and_transfer_knows_nothing_of_kv():
    assert _imports_under("disagg.kv", "disagg.transfer")  # the detector: kv/peer.py reads through a transport
    assert _imports_under("disagg.transfer", "disagg.kv") == {}
    assert "disagg.kv.connector" not in reachable("disagg.transfer.nixl")


def test_no_product_module_imports_a_test_double():
    def is_double(name: str) -> bool:
        parts = name.split(".")
        return parts[0] == "tests" or any(p.startswith("fake") for p in parts)

    doubles = {m: sorted(i for i in imports if is_double(i)) for m, imports in graph().items()}
    assert not any(doubles.values()), {m: d for m, d in doubles.items() if d}
    assert not [m for m in graph() if is_double(m)]  # and no test double lives in the product package


def test_the_engine_kv_dependency_runs_one_way():
    assert _imports_under("disagg.engine", "disagg.kv")  # the detector: the engine holds a KV connector
    assert _imports_under("disagg.kv", "disagg.engine") == {}  # kv types the engine's objects by Protocols


def _dynamic_imports(package: str = "disagg") -> dict[str, set[str]]:
    """Module names given as string literals to importlib.import_module / __import__ under `package`."""
    import ast

    from tests.importgraph import ROOT

    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                    found.setdefault(str(path.relative_to(ROOT)), set()).add(node.args[0].value)
    return found


def test_the_product_never_imports_the_bench_lab():
    # directly or through other modules (the graph holds only disagg's modules, so a transitive path to bench/
    # would show as some disagg module importing it), nor by name at run time
    products = list(graph())
    assert "disagg.sim.run" in products and "disagg.planning.cli" in products
    leaks = {m: sorted(d for d in reachable(m) | {m} if "bench" in top_levels(graph()[d])) for m in products}
    assert not any(leaks.values()), {m: d for m, d in leaks.items() if d}
    named = {p: names for p, names in _dynamic_imports().items() if any(n.split(".")[0] == "bench" for n in names)}
    assert named == {}


def test_the_simulator_and_planning_reach_no_ray_and_no_http_stack():
    shells = {"ray", "fastapi", "starlette", "uvicorn", "httpx"}
    cores = [m for m in graph() if m.startswith(("disagg.sim", "disagg.planning", "disagg.workload"))]
    assert "disagg.sim.cluster" in cores
    leaks = {
        m: sorted(
            f"{dep}: {sorted(top_levels(graph()[dep]) & shells)}"
            for dep in reachable(m) | {m}
            if top_levels(graph()[dep]) & shells
        )
        for m in cores
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


def test_no_package_cycle_anywhere_in_the_product():
    """Every package of disagg/ (and each top-level module, as its own node) depends on the others one way."""
    nodes = sorted({".".join(m.split(".")[:2]) for m in graph() if m != "disagg"})
    assert {"disagg.router", "disagg.sim", "disagg.engine", "disagg.kv", "disagg.protocol"} <= set(nodes)
    assert package_cycles(nodes) == []
    # the detector: a made-up back edge closes a cycle
    edges = package_edges(nodes)
    edges["disagg.protocol"] = {*edges["disagg.protocol"], "disagg.router"}
    assert cycles_in(edges)
