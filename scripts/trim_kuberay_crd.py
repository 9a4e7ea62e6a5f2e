"""Trim a KubeRay CRD (ray-project/kuberay, ray-operator/config/crd/bases/ray.io_*.yaml, Apache-2.0) to the part
tests/test_deploy.py checks our manifests against: the v1 `spec` schema without descriptions, with every embedded
Kubernetes object that kubernetes-validate checks instead (pod templates) cut to a typed placeholder.

    python scripts/trim_kuberay_crd.py ray.io_rayjobs.yaml deploy/schemas/rayjob.v1.json COMMIT
"""
from __future__ import annotations

import json
import sys

import yaml

# subtrees validated by kubernetes-validate against the core API (PodTemplateSpec)
_CORE = {"template", "submitterPodTemplate"}


def trim(node, key: str | None = None):
    if isinstance(node, dict):
        if key in _CORE and node.get("type") == "object":
            return {"type": "object", "x-disagg-core": "PodTemplateSpec"}
        return {k: trim(v, k) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [trim(v) for v in node]
    return node


def main() -> None:
    src, dst, commit = sys.argv[1:4]
    crd = yaml.safe_load(open(src))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = version["schema"]["openAPIV3Schema"]
    out = {"source": f"ray-project/kuberay@{commit}:{src.split('/')[-1]} (Apache-2.0), trimmed",
           "kind": crd["spec"]["names"]["kind"], "group": crd["spec"]["group"], "version": "v1",
           "spec": trim(schema["properties"]["spec"])}
    json.dump(out, open(dst, "w"), indent=None, separators=(",", ":"), sort_keys=True)


if __name__ == "__main__":
    main()
