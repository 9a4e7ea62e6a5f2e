"""deploy/ manifests are valid: KubeRay fields against the RayJob / RayCluster / RayService CRD schemas published
in the KubeRay repository (trimmed copies in deploy/schemas, see scripts/trim_kuberay_crd.py), and the embedded
pod templates and core objects against the Kubernetes API schemas (kubernetes-validate, strict); and nothing serves
open (`exposure_problems`: an endpoint on 0.0.0.0 without a key, a public Ray dashboard)."""
import copy
import json
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from crdcheck import check

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.34.0"
CRDS = {kind: json.loads((DEPLOY / "schemas" / f"{kind.lower()}.v1.json").read_text())
        for kind in ("RayJob", "RayCluster", "RayService")}
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def _documents():
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                yield pytest.param(doc, id=f"{path.name}#{i}:{doc['kind']}")


def _validate_core(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def test_there_are_manifests_for_a_job_and_for_long_running_serving():
    kinds = {doc.values[0]["kind"] for doc in _documents()}
    assert {"RayJob", "RayCluster", "Service"} <= kinds


@pytest.mark.parametrize("doc", list(_documents()))
def test_manifest_is_valid(doc):
    if doc["apiVersion"] == "ray.io/v1":
        crd = CRDS[doc["kind"]]
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
        _validate_core({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})  # metadata shape
        errors, core = check(doc["spec"], crd["spec"])
        assert errors == []
        assert core, "a KubeRay manifest embeds pod templates"
        for path, kind, template in core:
            assert kind == "PodTemplateSpec"
            try:
                _validate_core(_pod_template(template))
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path}: {exc.message} at {list(exc.path)}")
    else:
        _validate_core(doc)


def _serving_cluster() -> dict:
    return next(d for d in yaml.safe_load_all((DEPLOY / "kuberay-raycluster.yaml").read_text())
                if d and d["kind"] == "RayCluster")


def test_router_container_has_probes_on_the_health_endpoints():
    head = _serving_cluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    launcher = next(c for c in head if c["name"] == "disagg-launcher")
    assert launcher["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert launcher["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert launcher["startupProbe"]["httpGet"]["path"] == "/livez"
    ports = {p["name"]: p["containerPort"] for p in launcher["ports"]}
    assert ports["openai"] == int(launcher["args"][launcher["args"].index("--port") + 1])


def test_launcher_arguments_parse_and_place_actors_on_the_groups():
    import argparse

    from disagg.cluster.serve_cli import build_parser, cluster_config_from_args

    launcher = next(c for c in _serving_cluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
                    if c["name"] == "disagg-launcher")
    parser = argparse.ArgumentParser()
    build_parser(parser)
    config = cluster_config_from_args(parser.parse_args(launcher["args"]))
    spec = _serving_cluster()["spec"]
    offered = {g["groupName"]: json.loads(json.loads(g["rayStartParams"]["resources"]))
               for g in spec["workerGroupSpecs"]}
    offered["head"] = json.loads(json.loads(spec["headGroupSpec"]["rayStartParams"]["resources"]))
    assert set(config.prefill_resources) <= set(offered["prefill"])
    assert set(config.decode_resources) <= set(offered["decode"])
    assert set(config.router_resources) <= set(offered["head"])


@pytest.mark.parametrize("mutate,needle", [
    (lambda s: s.update(rayVersionn="2"), "unknown field 'rayVersionn'"),
    (lambda s: s["workerGroupSpecs"][0].update(replicas="two"), "expected integer"),
    (lambda s: s["workerGroupSpecs"][0].pop("groupName"), "missing required field 'groupName'"),
    (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 2}), "expected string"),
])
def test_crd_check_catches_broken_kuberay_fields(mutate, needle):
    spec = copy.deepcopy(_serving_cluster()["spec"])
    mutate(spec)
    errors, _ = check(spec, CRDS["RayCluster"]["spec"])
    assert any(needle in e for e in errors), errors


def test_core_check_catches_a_broken_pod_template():
    template = copy.deepcopy(_serving_cluster()["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][1]["livenessProbe"]["httpGet"]["port"] = {"name": "openai"}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_core(_pod_template(template))


# --- exposure: no manifest serves the endpoint open, nor the Ray dashboard (job submission = code execution) ---
LAUNCH = "disagg.cluster.launch"
PUBLIC = {"0.0.0.0", "::", "[::]"}


def _launcher_argvs(doc: dict):
    """(argv of each `disagg.cluster.launch` invocation, the pod spec it runs in) in a manifest."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayJob" and LAUNCH in spec.get("entrypoint", ""):
        argv = shlex.split(spec["entrypoint"])
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        yield argv[argv.index(LAUNCH) + 1:], head
    if doc["kind"] == "RayCluster":
        head = spec["headGroupSpec"]["template"]["spec"]
        for c in head["containers"]:
            if LAUNCH in c.get("command", []):
                yield c.get("args", []), head


def _secret_mounts(pod: dict) -> set[str]:
    secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
    return {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in secrets}


def exposure_problems(doc: dict) -> list[str]:
    """What in a manifest serves something open: an endpoint on a non-loopback host without an API key (the
    launcher's own check, which --insecure would silence: a manifest must not ship it), a keys file that is not
    mounted from a Secret, a Ray dashboard on every interface."""
    from disagg.cluster.serve_cli import build_parser
    from disagg.cluster.router_service import RouterConfig
    from disagg.errors import InsecureExposure
    from disagg.http.config import ApiKey

    problems = []
    for argv, pod in _launcher_argvs(doc):
        args = build_parser().parse_args(argv)
        keys = {"(keys file)": ApiKey("t")} if args.api_keys_file else None
        try:
            RouterConfig(host=args.host, api_key=args.api_key, keys=keys).check_exposure()
        except InsecureExposure as exc:
            problems.append(f"{doc['kind']}: {exc}")
        if args.insecure:
            problems.append(f"{doc['kind']}: --insecure")
        if args.api_keys_file and not any(args.api_keys_file.startswith(m + "/") for m in _secret_mounts(pod)):
            problems.append(f"{doc['kind']}: {args.api_keys_file} is not mounted from a Secret")
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec) if doc["kind"] in ("RayJob", "RayCluster") else {}
    host = cluster.get("headGroupSpec", {}).get("rayStartParams", {}).get("dashboard-host")
    if host in PUBLIC:
        problems.append(f"{doc['kind']}: the Ray dashboard binds {host}")
    return problems


@pytest.mark.parametrize("doc", list(_documents()))
def test_no_manifest_serves_the_endpoint_or_the_dashboard_open(doc):
    assert exposure_problems(doc) == []


def _head(doc: dict) -> dict:
    return doc["spec"]["headGroupSpec"]


def _launcher(doc: dict) -> dict:
    return next(c for c in _head(doc)["template"]["spec"]["containers"] if c["name"] == "disagg-launcher")


def _drop_keys(doc: dict) -> None:
    args = _launcher(doc)["args"]
    del args[args.index("--api-keys-file"):args.index("--api-keys-file") + 2]


@pytest.mark.parametrize("mutate,needle", [
    (_drop_keys, "without API keys"),
    (lambda d: (_drop_keys(d), _launcher(d)["args"].append("--insecure")), "--insecure"),
    (lambda d: _head(d)["rayStartParams"].update({"dashboard-host": "0.0.0.0"}), "dashboard binds 0.0.0.0"),
    (lambda d: _launcher(d).pop("volumeMounts"), "not mounted from a Secret"),
])
def test_exposure_check_catches_an_open_endpoint_or_dashboard(mutate, needle):
    doc = copy.deepcopy(_serving_cluster())
    mutate(doc)
    problems = exposure_problems(doc)
    assert any(needle in p for p in problems), problems


def test_exposure_check_reads_the_rayjob_entrypoint():
    doc = next(d for d in yaml.safe_load_all((DEPLOY / "kuberay-rayjob.yaml").read_text()) if d)
    doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace("--api-keys-file /etc/disagg/keys/keys.json", "")
    assert any("without API keys" in p for p in exposure_problems(doc))
