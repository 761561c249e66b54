"""A pure-Python renderer for the subset of kustomize that docker/k8s/ uses, for machines without kubectl.

Contract: `render(directory)` returns the resources `kubectl kustomize directory` would print, as dicts
(order aside). Supported: `resources` (files and directories with their own kustomization.yaml),
`images` (newName / newTag / digest on container images) and `patches` whose `patch` is an inline
JSON 6902 list (add / replace / remove / test) with a `target` (group, version, kind, name). Anything else
in a kustomization raises `Unsupported`, so the renderer never silently renders something different.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}


class Unsupported(Exception):
    pass


def render(directory: Path | str) -> list[dict]:
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KEYS
    if unknown:
        raise Unsupported(f"{directory}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources.extend(render(path))
        else:
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for image in kustomization.get("images", []):
        for resource in resources:
            _set_image(resource, image)
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise Unsupported("only inline JSON 6902 patches are supported")
        matched = [r for r in resources if _matches(r, patch.get("target", {}))]
        if not matched:
            raise ValueError(f"patch target {patch.get('target')} matches no resource")
        for resource in matched:
            for op in ops:
                _apply(resource, op)
    return resources


def _matches(resource: dict, target: dict) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    checks = {"group": group, "version": version, "kind": resource["kind"], "name": resource["metadata"]["name"]}
    return all(checks[key] == value for key, value in target.items() if key in checks)


def _containers(resource: dict) -> list[dict]:
    pod = resource.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def _set_image(resource: dict, image: dict) -> None:
    for container in _containers(resource):
        name, tag = _split_image(container["image"])
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
        else:
            tag = image.get("newTag", tag)
            container["image"] = f"{name}:{tag}" if tag else name


def _split_image(image: str) -> tuple[str, str | None]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, None
    return name, tag


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def _apply(resource: dict, op: dict) -> None:
    *parents, last = _pointer(op["path"])
    node = resource
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key = int(last) if isinstance(node, list) and last != "-" else last
    kind = op["op"]
    if kind == "test":
        if node[key] != op["value"]:
            raise ValueError(f"patch test failed at {op['path']}: {node[key]!r} != {op['value']!r}")
    elif kind == "remove":
        del node[key]
    elif kind == "replace":
        node[key]  # noqa: B018  (replace requires the path to exist, as in kustomize)
        node[key] = copy.deepcopy(op["value"])
    elif kind == "add":
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else key, copy.deepcopy(op["value"]))
        else:
            node[key] = copy.deepcopy(op["value"])
    else:
        raise Unsupported(f"JSON 6902 op {kind!r}")
