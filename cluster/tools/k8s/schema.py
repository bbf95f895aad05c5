"""Schema validation: built-in kinds against Kubernetes' schemas (kubernetes-validate), custom
resources against JSON Schemas made from their CRDs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from cluster.tools.checkout import REPO_ROOT
from cluster.tools.k8s.manifests import _l, _path, _ref
from cluster.tools.k8s.problems import K8sError, Problem
from cluster.tools.k8s.render import load_docs

DEFAULT_CRDS = REPO_ROOT.parent / "shared" / "crds"
DEFAULT_KUBE_VERSION = "1.32.0"


def openapi_to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural OpenAPI v3 schema as JSON Schema, with the API server's semantics:
    unknown fields are errors (``kubectl apply`` validates strictly) unless
    ``x-kubernetes-preserve-unknown-fields``; a required field that has a default is not
    required (the server fills it in); ``nullable`` allows null; int-or-string takes both."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")
           and k not in ("properties", "items", "additionalProperties", "anyOf", "allOf",
                         "oneOf", "not", "nullable", "required", "description")}
    props = schema.get("properties")
    if props is not None:
        out["properties"] = {k: openapi_to_jsonschema(v) for k, v in props.items()}
        required = [r for r in schema.get("required", []) if "default" not in props.get(r, {})]
        if required:
            out["required"] = required
    elif schema.get("required"):
        out["required"] = schema["required"]
    if isinstance(schema.get("items"), dict):
        out["items"] = openapi_to_jsonschema(schema["items"])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = openapi_to_jsonschema(extra)
    elif extra is not None:
        out["additionalProperties"] = extra
    elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [openapi_to_jsonschema(s) for s in schema[key]]
    if "not" in schema:
        out["not"] = openapi_to_jsonschema(schema["not"])
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _crd_docs(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml", ".json")) \
            if path.is_dir() else [path]
        for f in files:
            for doc in load_docs(f.read_text()):
                if str(doc.get("kind", "")).endswith("List"):
                    yield from _l(doc.get("items"))
                else:
                    yield doc


@lru_cache(maxsize=8)
def crd_validators(paths: tuple[Path, ...]) -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> validator, for every served version of the CRDs under ``paths``."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise K8sError(f"CRD path not found: {', '.join(missing)} (give --crds, e.g. the output "
                       f"of `kubectl get crd rayservices.ray.io -o yaml`)")
    validators = {}
    for crd in _crd_docs(paths):
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served", True):
                schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                validators[key] = jsonschema.Draft7Validator(schema)
    return validators


def drop_nulls(value: Any) -> Any:
    """Drop null fields, as the API server does before validating."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def schema_problems(doc: dict[str, Any], source: str, crds: tuple[Path, ...],
                    kube_version: str) -> list[Problem]:
    import kubernetes_validate  # only validate needs it

    doc = drop_nulls(doc)
    if not doc.get("apiVersion") or not doc.get("kind"):
        return [Problem(source, _ref(doc), "k8s-schema", "apiVersion and kind are required")]
    key = (str(doc.get("apiVersion")), str(doc.get("kind")))
    validator = crd_validators(crds).get(key)
    if validator is not None:
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
        return [Problem(source, _ref(doc), "crd-schema", f"{_path(e.path) or '<root>'}: "
                        f"{e.message}") for e in errors]
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [Problem(source, _ref(doc), "k8s-schema", f"{_path(e.path)}: {e.message}")]
    except kubernetes_validate.SchemaNotFoundError:
        return [Problem(source, _ref(doc), "no-schema",
                        f"no schema for {key[0]} {key[1]}: pass its CRD with --crds")]
    except kubernetes_validate.VersionNotSupportedError as e:
        raise K8sError(f"kubernetes-validate does not know Kubernetes {kube_version}") from e
    return []
