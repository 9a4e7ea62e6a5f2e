"""The model table's run-time changes kept for a restarted router (cluster/runtime_table.py): what is saved
round-trips the wire, and a router rebuilt from its deployment serves again the models loaded at run time (when
their workers are still there), each base's adapters as they were (removed ones stay removed) and the aliases as
they were.  The real restart (a router actor SIGKILLed, detached workers, Ray's GCS) is in
tests/test_runtime_table_ray.py."""
from disagg.cluster.router_service import ModelRoute
from disagg.cluster.runtime_table import RuntimeTable, end_runtime_workers, read_table, restore_table, snapshot
from disagg.http.models import ModelTable, ServedModel
from disagg.protocol import LoRARef
from disagg.router.router import RouterCore


class DictStore:
    def __init__(self):
        self.value = None

    def save(self, state):
        self.value = state

    def load(self):
        return self.value

    def clear(self):
        self.value = None


class Handle:
    def __init__(self, name):
        self.name = name


def _served(name):
    core = RouterCore({}, {f"{name}-decode-0": Handle(f"{name}-decode-0")})
    return ServedModel(name, core, None, 512, namespace=name, model_dir="/models/" + name)


def _route(name):
    return ModelRoute(name, "/models/" + name, 16, 512, [], [f"{name}-decode-0"], namespace=name)


def _deployment():
    """What a restarted router builds from its arguments: model `a`, its adapter `a-old`, alias `x`."""
    a = _served("a")
    table = ModelTable([a])
    table.add(a.adapter(LoRARef("a-old", "/adapters/old", "d0")))
    table.aliases.set("x", {"a": 1.0}, table.serving_ids())
    return table


def test_a_restarted_router_serves_what_was_changed_at_run_time():
    table = _deployment()
    b = _served("b")  # loaded at run time
    table.add(b)
    table.add(table.served("a").adapter(LoRARef("a-sql", "/adapters/sql", "d1")))  # an adapter at run time
    table.remove("a-old")  # a deployment adapter removed
    table.aliases.remove("x")
    table.aliases.set("coder", {"a": 90.0, "b": 10.0}, table.serving_ids())
    store = DictStore()
    store.save(snapshot(table, {"b": _route("b"), "gone": _route("gone")}).to_wire())  # "gone" was unloaded

    state = read_table(store)
    assert [r.name for r in state.routes] == ["b"]
    assert state.adapters == {"a": [LoRARef("a-sql", "/adapters/sql", "d1")], "b": []}
    assert RuntimeTable.from_wire(state.to_wire()) == state

    again = _deployment()
    rebuilt = []
    restore_table(again, state, lambda route: rebuilt.append(route.name) or _served(route.name))
    assert rebuilt == ["b"]
    assert sorted(again.ids()) == ["a", "a-sql", "b"]  # a-old stays removed
    assert again.served("a-sql").parent == "a" and again.served("a-sql").lora.digest == "d1"
    assert [(alias, r.as_dict()) for alias, r in again.aliases.items()] == [("coder", {"a": 90.0, "b": 10.0})]


def test_a_model_whose_workers_are_gone_is_not_served_again_nor_its_aliases():
    table = _deployment()
    table.add(_served("b"))
    table.aliases.set("coder", {"b": 1.0}, table.serving_ids())
    state = snapshot(table, {"b": _route("b")})
    again = _deployment()
    restore_table(again, state, lambda route: None)  # every worker of b died with the cluster's node
    assert sorted(again.ids()) == ["a", "a-old"] and again.aliases.items() == [("x", again.aliases.get("x"))]


def test_nothing_saved_or_an_unreadable_state_leaves_the_deployment():
    store = DictStore()
    assert read_table(store) is None
    store.save(b"\x81\xa4type\xa5other")  # another message, or another version of this one
    assert read_table(store) is None
    end_runtime_workers(store, "")  # nothing to end; the key is cleared
    assert store.value is None
