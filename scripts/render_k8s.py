#!/usr/bin/env python3
"""Render a kustomization under k8s/ to one multi-document YAML stream on stdout.

    python scripts/render_k8s.py k8s/overlays/minio > minio.yaml

Uses `kubectl kustomize` when kubectl is on PATH (the real thing). Without it, a small renderer
in Python covers exactly the features k8s/ uses, so the static checks still run offline:
resources (files and bases), namespace, labels (without selectors), configMapGenerator (create /
replace, files, name suffix from a content hash), images (newName / newTag / digest) and patches
(JSON 6902 with a target kind and name). Anything else is an error, not a silent difference. The
hash suffix differs from kustomize's own; nothing checked here depends on its value.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images", "patches"}


def render_with_kubectl(path: Path) -> str:
    return subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout


def _load(path: Path) -> tuple[list[dict], dict]:
    """(resources, generators) for one kustomization; generators are name -> ConfigMap."""
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise SystemExit(f"{path}: the Python renderer does not support {sorted(unknown)}; install kubectl")
    resources: list[dict] = []
    generated: dict[str, dict] = {}
    for entry in kust.get("resources", []):
        target = path / entry
        if target.is_dir():
            sub_resources, sub_generated = _load(target)
            resources += sub_resources
            generated.update(sub_generated)
        else:
            resources += [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
    for gen in kust.get("configMapGenerator", []):
        data = {Path(f).name: (path / f).read_text() for f in gen.get("files", [])}
        behavior = gen.get("behavior", "create")
        if behavior == "create" and gen["name"] in generated:
            raise SystemExit(f"{path}: configMapGenerator {gen['name']} exists; use behavior: replace")
        if behavior not in ("create", "replace"):
            raise SystemExit(f"{path}: configMapGenerator behavior {behavior} not supported")
        if behavior == "replace":
            if gen["name"] not in generated:
                raise SystemExit(f"{path}: configMapGenerator {gen['name']}: nothing to replace")
            generated[gen["name"]]["data"] = data  # the base's labels and namespace stay
        else:
            generated[gen["name"]] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                                      "data": data}
    for patch in kust.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        matches = [r for r in resources if r["kind"] == target["kind"] and r["metadata"]["name"] == target["name"]]
        if len(matches) != 1:
            raise SystemExit(f"{path}: patch target {target} matches {len(matches)} resources")
        for op in ops:
            _json_patch(matches[0], op)
        if matches[0]["metadata"].get("annotations") == {}:
            del matches[0]["metadata"]["annotations"]  # kustomize drops a map left empty
    for image in kust.get("images", []):
        for r in resources:
            for c in _containers(r):
                if c["image"].split(":")[0].split("@")[0] == image["name"]:
                    name = image.get("newName", image["name"])
                    c["image"] = f"{name}@{image['digest']}" if "digest" in image else f"{name}:{image.get('newTag', 'latest')}"
    for item in kust.get("labels", []):
        if item.get("includeSelectors") or item.get("includeTemplates"):
            raise SystemExit(f"{path}: labels with selectors/templates not supported")
        for r in resources + list(generated.values()):
            r["metadata"].setdefault("labels", {}).update(item["pairs"])
    if "namespace" in kust:
        for r in resources + list(generated.values()):
            if r["kind"] != "Namespace":
                r["metadata"]["namespace"] = kust["namespace"]
    return resources, generated


def _containers(resource: dict) -> list:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def _json_patch(doc: dict, op: dict) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    if op["op"] == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    elif op["op"] in ("add", "replace"):
        if isinstance(parent, list):
            parent.append(op["value"]) if last == "-" else parent.insert(int(last), op["value"])
        else:
            parent[last] = op["value"]
    else:
        raise SystemExit(f"JSON patch op {op['op']} not supported")


def render_in_python(path: Path) -> str:
    resources, generated = _load(path)
    renames = {}
    for name, cm in generated.items():
        digest = hashlib.sha256(json.dumps(cm["data"], sort_keys=True).encode()).hexdigest()[:10]
        renames[name] = cm["metadata"]["name"] = f"{name}-{digest}"
    for r in resources:
        for vol in r.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] in renames:
                vol["configMap"]["name"] = renames[vol["configMap"]["name"]]
    docs = [copy.deepcopy(d) for d in resources + list(generated.values())]
    return yaml.safe_dump_all(docs, sort_keys=False)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[1])
    if shutil.which("kubectl"):
        sys.stdout.write(render_with_kubectl(path))
    else:
        print(f"render_k8s: no kubectl, rendering {path} in Python", file=sys.stderr)
        sys.stdout.write(render_in_python(path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
