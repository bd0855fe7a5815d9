"""Render a deploy/ kustomization offline, without kubectl.

Supports exactly the Kustomize features deploy/ uses (anything else is refused, so the
output never silently differs from `kubectl kustomize`): `resources` (YAML files and
directories holding a kustomization), `namespace`, `configMapGenerator` with `literals`
(behaviors create, merge and replace) under `generatorOptions.disableNameSuffixHash: true`,
and `images` (newName / newTag). Usage: `python deploy/render.py deploy/overlays/eu-west`.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

KNOWN_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "configMapGenerator",
    "generatorOptions",
    "images",
}


class RenderError(ValueError):
    """A kustomization this renderer does not handle, or a broken one."""


def render(directory: Path | str) -> list[Manifest]:
    """Every object the kustomization in `directory` produces, as dicts."""
    root = Path(directory)
    kustomization = _load_kustomization(root)
    objects: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        objects.extend(_load_resource(root / entry))
    _apply_generators(kustomization, objects)
    if "namespace" in kustomization:
        for obj in objects:
            obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        _apply_image(image, objects)
    return objects


def _load_kustomization(root: Path) -> Manifest:
    path = root / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{root}: no kustomization.yaml")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise RenderError(f"{path}: not a mapping")
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise RenderError(f"{path}: unsupported fields {sorted(unknown)}")
    return data


def _load_resource(path: Path) -> list[Manifest]:
    if path.is_dir():
        return render(path)
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    if not all(isinstance(doc, dict) for doc in docs):
        raise RenderError(f"{path}: every document must be a mapping")
    return docs


def _apply_generators(kustomization: Manifest, objects: list[Manifest]) -> None:
    generators = kustomization.get("configMapGenerator", [])
    options = kustomization.get("generatorOptions", {})
    creates = [g for g in generators if g.get("behavior", "create") == "create"]
    if creates and options.get("disableNameSuffixHash") is not True:
        raise RenderError("configMapGenerator needs generatorOptions.disableNameSuffixHash")
    for generator in generators:
        _apply_generator(generator, objects, kustomization.get("namespace"))


def _apply_generator(generator: Manifest, objects: list[Manifest], namespace: Any) -> None:
    unknown = set(generator) - {"name", "behavior", "literals"}
    if unknown:
        raise RenderError(f"configMapGenerator {generator.get('name')}: unsupported {unknown}")
    name = generator["name"]
    data = dict(_literal(item) for item in generator.get("literals", []))
    behavior = generator.get("behavior", "create")
    existing = [o for o in objects if o.get("kind") == "ConfigMap" and _name(o) == name]
    if behavior == "create":
        if existing:
            raise RenderError(f"ConfigMap {name} exists: use behavior merge or replace")
        metadata: Manifest = {"name": name}
        if namespace is not None:
            metadata["namespace"] = namespace
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        )
    elif behavior in ("merge", "replace") and len(existing) == 1:
        target = existing[0]
        target["data"] = {**target.get("data", {}), **data} if behavior == "merge" else data
    else:
        raise RenderError(f"ConfigMap {name}: cannot {behavior} (found {len(existing)})")


def _literal(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RenderError(f"literal {item!r} is not KEY=VALUE")
    return key, value


def _name(obj: Manifest) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def _apply_image(image: Manifest, objects: list[Manifest]) -> None:
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            name, _, tag = _split_image(container.get("image", ""))
            if name != image["name"]:
                continue
            new_name = image.get("newName", name)
            new_tag = image.get("newTag", tag)
            container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


def _split_image(reference: str) -> tuple[str, str, str]:
    """(name, ':', tag) of an image reference; a registry port is not a tag."""
    head, sep, tail = reference.rpartition(":")
    if sep and "/" not in tail:
        return head, sep, tail
    return reference, "", ""


def main(argv: list[str]) -> int:
    """Print the rendered objects of the kustomization directory given as YAML."""
    if len(argv) != 1:
        print("usage: render.py DIRECTORY", file=sys.stderr)
        return 2
    try:
        objects = render(argv[0])
    except (RenderError, OSError, yaml.YAMLError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    print(yaml.safe_dump_all(copy.deepcopy(objects), sort_keys=True), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
