#!/usr/bin/env python3
"""Offline checks for the custom resource under k8s/ (the Kubeflow training operator's PyTorchJob),
which kubernetes-validate has no schema for (it only warns, and passes, on a kind it does not know).

    python scripts/k8s_crd.py IN.yaml OUT.yaml

reads a rendered manifest stream and writes it to OUT.yaml with every PyTorchJob replaced by one
`v1 Pod` per replica type, so that kubernetes-validate (strict) and checkov check what the operator
will create: the pod template as a Pod, with the pod restartPolicy the operator derives from the
replica's, and the PyTorchJob's checkov.io/skip annotations carried over. Before that, each
PyTorchJob itself is checked against the API models of the operator's own Python SDK
(kubeflow-training, generated from the operator's OpenAPI spec): every field name known, every value
of the declared type, down to the pod template (which the Pod form then covers). That is a
structural check of field names and types, not the CRD's full schema nor the operator's admission
webhook: the webhook's rules this job depends on (a container named pytorch, one Master replica,
nprocPerNode, restart policies) are asserted in tests/test_deploy_static.py. Exit 1 on any error.

The SDK's model files are read with `ast` (their openapi_types / attribute_map dictionaries), not
imported, so neither the SDK's Kubernetes client nor any network access is needed.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import re
import sys
from pathlib import Path

import yaml

PYTORCHJOB = ("kubeflow.org/v1", "PyTorchJob")
# ReplicaSpec.restartPolicy -> the pod's restartPolicy: the operator copies it, except ExitCode,
# for which the pods get Never and the operator itself decides on a restart.
POD_RESTART_POLICY = {"Always": "Always", "OnFailure": "OnFailure", "Never": "Never", "ExitCode": "Never"}


def replica_pods(job: dict) -> list[dict]:
    """The pods a PyTorchJob's replica templates describe, one per replica type, as v1 Pods."""
    carried = {k: v for k, v in job["metadata"].get("annotations", {}).items() if k.startswith("checkov.io/")}
    pods = []
    for rtype, replica in job["spec"]["pytorchReplicaSpecs"].items():
        template = copy.deepcopy(replica["template"])
        metadata = template.get("metadata", {})
        metadata["name"] = f"{job['metadata']['name']}-{rtype.lower()}-0"
        if "namespace" in job["metadata"]:
            metadata["namespace"] = job["metadata"]["namespace"]
        if carried:
            metadata["annotations"] = {**carried, **metadata.get("annotations", {})}
        spec = template["spec"]
        spec["restartPolicy"] = POD_RESTART_POLICY[replica.get("restartPolicy", "Never")]
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    return pods


# -- the SDK's models ----------------------------------------------------------------------------


def _sdk_models() -> dict[str, tuple[dict, dict]]:
    """Class name -> (openapi_types, attribute_map) for every model in the installed kubeflow-training."""
    try:
        dist = importlib.metadata.distribution("kubeflow-training")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModuleNotFoundError("kubeflow-training (the training operator's SDK) is not installed") from exc
    models = {}
    for file in dist.files or []:
        if not re.fullmatch(r"kubeflow/training/models/kubeflow_org_v1_\w+\.py", str(file)):
            continue
        tree = ast.parse(Path(dist.locate_file(file)).read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            fields = {t.id: ast.literal_eval(n.value) for n in cls.body if isinstance(n, ast.Assign)
                      for t in n.targets if isinstance(t, ast.Name) and t.id in ("openapi_types", "attribute_map")}
            if len(fields) == 2:
                models[cls.name] = (fields["openapi_types"], fields["attribute_map"])
    if "KubeflowOrgV1PyTorchJob" not in models:
        raise ModuleNotFoundError("kubeflow-training has no KubeflowOrgV1PyTorchJob model")
    return models


_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def _check(value, type_name: str, where: str, models: dict, errors: list[str]) -> None:
    if value is None:
        return
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list")
            return
        for i, item in enumerate(value):
            _check(item, match.group(1), f"{where}[{i}]", models, errors)
    elif match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a map")
            return
        for key, item in value.items():
            _check(item, match.group(1), f"{where}.{key}", models, errors)
    elif type_name in _PRIMITIVES:
        expected = _PRIMITIVES[type_name]
        if not isinstance(value, expected) or (type_name == "int" and isinstance(value, bool)):
            errors.append(f"{where}: expected {type_name}, got {type(value).__name__} {value!r}")
    elif type_name == "Quantity":
        if not isinstance(value, (str, int, float)):
            errors.append(f"{where}: expected a quantity")
    elif type_name in models:
        types, names = models[type_name]
        if not isinstance(value, dict):
            errors.append(f"{where}: expected an object ({type_name})")
            return
        by_json = {json_name: types[attr] for attr, json_name in names.items()}
        for key, item in value.items():
            if key not in by_json:
                errors.append(f"{where}: unknown field {key!r} (not in {type_name})")
            else:
                _check(item, by_json[key], f"{where}.{key}", models, errors)
    elif type_name.startswith(("V1", "V2", "K8sIo")):
        # A Kubernetes core type (ObjectMeta, PodTemplateSpec, ...): the Pod form covers the pod
        # template with kubernetes-validate; here only its shape.
        if not isinstance(value, dict):
            errors.append(f"{where}: expected an object ({type_name})")
    else:
        errors.append(f"{where}: no rule for type {type_name}")


def sdk_errors(job: dict) -> list[str]:
    """Field-name and type errors of a PyTorchJob against the kubeflow-training SDK's models."""
    models = _sdk_models()
    errors: list[str] = []
    if (job.get("apiVersion"), job.get("kind")) != PYTORCHJOB:
        errors.append(f"not a {'/'.join(PYTORCHJOB)}")
    if "status" in job:
        errors.append("a manifest carries no status")
    _check(job, "KubeflowOrgV1PyTorchJob", "PyTorchJob", models, errors)
    return errors


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    docs = [d for d in yaml.safe_load_all(Path(argv[1]).read_text()) if d]
    out, failed = [], False
    for doc in docs:
        if (doc.get("apiVersion"), doc.get("kind")) == PYTORCHJOB:
            for error in sdk_errors(doc):
                print(f"{argv[1]}: PyTorchJob {doc['metadata']['name']}: {error}", file=sys.stderr)
                failed = True
            out += replica_pods(doc)
        else:
            out.append(doc)
    Path(argv[2]).write_text(yaml.safe_dump_all(out, sort_keys=False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
