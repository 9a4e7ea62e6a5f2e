"""deploy/ manifests are valid: KubeRay fields against the RayJob / RayCluster / RayService CRD schemas published
in the KubeRay repository (trimmed copies in deploy/schemas, see scripts/trim_kuberay_crd.py), and the embedded
pod templates and core objects against the Kubernetes API schemas (kubernetes-validate, strict)."""
import copy
import json
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
    from disagg.cluster.launch import build_parser, cluster_config_from_args
    import argparse

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
