#!/usr/bin/env python3
"""Render a kustomization under k8s/ to one multi-document YAML stream on stdout.

    python scripts/render_k8s.py k8s/overlays/minio > minio.yaml

Uses `kubectl kustomize` when kubectl is on PATH (the real thing). Without it, a small renderer
in Python covers exactly the features k8s/ uses, so the static checks still run offline:
resources (files and bases), namespace, labels (without selectors), configMapGenerator (create /
replace, files, name suffix from a content hash), images (newName / newTag / digest, in `containers`
at any depth, as kustomize does), patches (JSON 6902 with a target kind and name; a strategic-merge
patch only as `$patch: delete` of a whole resource) and configurations (only nameReference entries
for ConfigMaps, i.e. where a custom kind such as a PyTorchJob mounts one). Anything else is an error,
not a silent difference. The hash suffix differs from kustomize's own; nothing checked here depends
on its value.
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

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images", "patches",
             "configurations"}


def render_with_kubectl(path: Path) -> str:
    return subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout


def _load(path: Path) -> tuple[list[dict], dict, list[dict]]:
    """(resources, generators, ConfigMap name references) for one kustomization; generators are
    name -> ConfigMap, references are kustomize fieldSpecs ({kind, path}) from `configurations`."""
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise SystemExit(f"{path}: the Python renderer does not support {sorted(unknown)}; install kubectl")
    resources: list[dict] = []
    generated: dict[str, dict] = {}
    references: list[dict] = []
    for entry in kust.get("resources", []):
        target = path / entry
        if target.is_dir():
            sub_resources, sub_generated, sub_references = _load(target)
            resources += sub_resources
            generated.update(sub_generated)
            references += sub_references  # kustomize, too, hands a base's configurations up
        else:
            # A JSON round trip: YAML anchors become separate copies, as in kustomize's output.
            resources += [json.loads(json.dumps(doc)) for doc in yaml.safe_load_all(target.read_text()) if doc]
    for entry in kust.get("configurations", []):
        config = yaml.safe_load((path / entry).read_text())
        if set(config) != {"nameReference"} or any(ref["kind"] != "ConfigMap" for ref in config["nameReference"]):
            raise SystemExit(f"{path}/{entry}: only nameReference entries for ConfigMaps are supported")
        references += [spec for ref in config["nameReference"] for spec in ref["fieldSpecs"]]
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
        body = yaml.safe_load(patch["patch"])
        if isinstance(body, dict):  # a strategic-merge patch: only deleting a whole resource
            if body.get("$patch") != "delete" or set(body) - {"apiVersion", "kind", "metadata", "$patch"}:
                raise SystemExit(f"{path}: strategic-merge patches other than $patch: delete are not supported")
            before = len(resources)
            resources = [r for r in resources if (r["kind"], r["metadata"]["name"]) !=
                         (body["kind"], body["metadata"]["name"])]
            if len(resources) != before - 1:
                raise SystemExit(f"{path}: $patch: delete of {body['kind']} {body['metadata']['name']} matches "
                                 f"{before - len(resources)} resources")
            continue
        target = patch["target"]
        ops = body
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
    return resources, generated, references


def _containers(node) -> list:
    """Every container under `containers` / `initContainers` at any depth (kustomize's images
    transformer does the same, so a PyTorchJob's replica templates are covered)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += [c for c in value if isinstance(c, dict) and "image" in c]
            else:
                found += _containers(value)
    elif isinstance(node, list):
        for value in node:
            found += _containers(value)
    return found


def _walk(node, parts: list[str]):
    """The dicts holding the field that a kustomize fieldSpec path names (lists are walked through)."""
    if isinstance(node, list):
        return [hit for item in node for hit in _walk(item, parts)]
    if not isinstance(node, dict):
        return []
    if len(parts) == 1:
        return [node] if parts[0] in node else []
    return _walk(node.get(parts[0].removesuffix("[]")), parts[1:])


def _json_patch(doc: dict, op: dict) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    if op["op"] == "test":
        value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
        if value != op["value"]:
            raise SystemExit(f"JSON patch test failed at {op['path']}: {value!r} != {op['value']!r}")
    elif op["op"] == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    elif op["op"] in ("add", "replace"):
        if isinstance(parent, list):
            parent.append(op["value"]) if last == "-" else parent.insert(int(last), op["value"])
        else:
            parent[last] = op["value"]
    else:
        raise SystemExit(f"JSON patch op {op['op']} not supported")


def render_in_python(path: Path) -> str:
    resources, generated, references = _load(path)
    renames = {}
    for name, cm in generated.items():
        digest = hashlib.sha256(json.dumps(cm["data"], sort_keys=True).encode()).hexdigest()[:10]
        renames[name] = cm["metadata"]["name"] = f"{name}-{digest}"
    for r in resources:
        for vol in r.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] in renames:
                vol["configMap"]["name"] = renames[vol["configMap"]["name"]]
        for spec in references:
            if spec.get("kind", r["kind"]) == r["kind"]:
                for holder in _walk(r, spec["path"].split("/")):
                    leaf = spec["path"].split("/")[-1]
                    holder[leaf] = renames.get(holder[leaf], holder[leaf])
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
