"""Offline validation of everything under cluster_configs/.

- Ray cluster launcher YAMLs (aws.yaml, gcp.yaml): the autoscaler JSON schema shipped in the Ray wheel,
  Ray's own (private) prepare_config + validate_config, and the project's rules (head takes no work,
  every node type declares resources, GPU hardware <=> GPU resource, ...).
- KubeRay manifests (RayCluster, RayJob, and the RayJob template inside the reclustering CronJob's
  ConfigMap): the openAPIV3Schema of the vendored KubeRay CRDs in strict mode (unknown fields are
  errors, as with `kubectl apply`'s default strict field validation), plus the RayCluster / RayJob
  rules the KubeRay operator enforces at reconcile time (ported from
  ray-operator/controllers/ray/utils/validation.go), which no schema expresses.
- Built-in kinds (CronJob, ServiceAccount, Role, RoleBinding, ConfigMap): kubernetes-validate, strict.
- runtime_env.yaml, image pins, the CronJob's submit-and-wait script (run against a fake kubectl), and
  a scan for credentials.

Not checked here (needs a cluster or a cloud account): CEL `x-kubernetes-validations` rules (the ones
our manifests touch are re-implemented in `rayjob_spec_errors`), `x-kubernetes-list-type: map` key
uniqueness, that AMIs / image families / container tags exist, IAM permissions.
"""

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "cluster_configs"
KUBERAY = CONFIGS / "kuberay"
VENDORED_CRDS = KUBERAY / "crds"
# In CI the repository is a fresh clone with shared/ beside it; only the drift check below needs it.
SHARED_CRDS = REPO.parent / "shared" / "schemas" / "kuberay-crds"
RAY_YAMLS = [CONFIGS / "aws.yaml", CONFIGS / "gcp.yaml"]
# A Kubernetes version that kubernetes-validate ships schemas for (it has 1.25 ... 1.37 offline).
K8S_VERSION = "1.33"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
TEMPLATE_NAME = "lake-recluster-29301234"  # what the CronJob's script makes of __RAYJOB_NAME__

# --------------------------------------------------------------------------------------------------
# Loading


# libyaml's safe loader keeps the multi-MB CRDs fast (about 5x the pure-Python loader).
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YAML_LOADER)


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=YAML_LOADER) if doc is not None]


@functools.cache
def pyproject_pins() -> dict[str, str]:
    """`name -> version` for the `==` pins in pyproject.toml (extras dropped: ray[...] -> ray)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = (re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", dep) for dep in deps)
    return {m.group(1): m.group(2) for m in pins if m}


def embedded_rayjob(configmap: dict[str, Any]) -> dict[str, Any]:
    """The RayJob the CronJob's pod creates, with its name placeholder filled like the script does."""
    text = configmap["data"]["rayjob.yaml"].replace("__RAYJOB_NAME__", TEMPLATE_NAME)
    doc: dict[str, Any] = load_yaml(text)
    return doc


def kuberay_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object in cluster_configs/kuberay/, plus the RayJob inside the ConfigMap."""
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_docs(path):
            docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
            if doc["kind"] == "ConfigMap" and "rayjob.yaml" in doc.get("data", {}):
                rayjob = embedded_rayjob(doc)
                docs.append((f"{path.name}:RayJob/{rayjob['metadata']['name']} (in the ConfigMap)", rayjob))
    return docs


KUBERAY_DOCS = kuberay_documents()
CRD_DOCS = [(i, d) for i, d in KUBERAY_DOCS if d["kind"] in CRD_FILES]
BUILTIN_DOCS = [(i, d) for i, d in KUBERAY_DOCS if d["kind"] not in CRD_FILES]


def find_doc(kind: str, file: str = "cronjob-recluster.yaml") -> dict[str, Any]:
    matches = [d for i, d in KUBERAY_DOCS if i.startswith(f"{file}:{kind}/")]
    assert len(matches) == 1, f"expected one {kind} in {file}, found {len(matches)}"
    return matches[0]


def iter_containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container (and init container) anywhere inside a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from iter_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_containers(item)


# --------------------------------------------------------------------------------------------------
# Ray cluster launcher validators


@functools.cache
def ray_autoscaler_schema() -> dict[str, Any]:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the installed Ray ({ray.__version__}) moved its schema")
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def ray_schema_errors(config: dict[str, Any]) -> list[str]:
    """The file as written against ray-schema.json (no defaults merged in)."""
    schema = ray_autoscaler_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)  # the file declares draft-07
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(config)]


def ray_validate_config_errors(config: dict[str, Any]) -> list[str]:
    """What `ray up` checks before it talks to the cloud: prepare_config (merge the provider's
    defaults.yaml) then validate_config (schema again + head type + max_workers >= sum(min_workers)).

    Both are private Ray APIs (pinned ray==2.60.0), wrapped here only. `ray up` additionally calls the
    provider's fillout_available_node_types_resources (AWS API) between the two; the configs declare
    `resources` for every node type, so that cloud call has nothing to fill and is skipped here.
    """
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:
        raise RuntimeError(f"Ray {ray.__version__} moved its private config validation: {exc}") from exc
    try:
        validate_config(prepare_config(json.loads(json.dumps(config))))
    except (jsonschema.ValidationError, ValueError, RuntimeError, AssertionError) as exc:
        return [getattr(exc, "message", str(exc))]
    return []


def has_gpu_hardware(node_config: dict[str, Any]) -> bool:
    """AWS GPU instance families (g4dn, g5, g6, p4d, p5, ...) or GCP attached / built-in accelerators."""
    if node_config.get("guestAccelerators"):
        return True
    if re.match(r"^[gp]\d", str(node_config.get("InstanceType", ""))):
        return True
    return str(node_config.get("machineType", "")).startswith(("a2-", "a3-", "g2-"))


def ray_config_rule_errors(config: dict[str, Any]) -> list[str]:
    """Project rules for the launcher configs (docs/conventions.md, ray-notes 4.2)."""
    errors: list[str] = []
    types: dict[str, dict[str, Any]] = config.get("available_node_types", {})
    head = config.get("head_node_type")
    if sum(t.get("min_workers", 0) for t in types.values()) > config.get("max_workers", 0):
        errors.append("max_workers is smaller than the sum of min_workers")
    if "idle_timeout_minutes" not in config:
        errors.append("idle_timeout_minutes is not set")
    for name, node_type in types.items():
        resources = node_type.get("resources") or {}
        if not resources:
            errors.append(f"{name}: no resources declared (the autoscaler cannot plan without them)")
        if node_type.get("min_workers", 0) > node_type.get("max_workers", config.get("max_workers", 0)):
            errors.append(f"{name}: min_workers > max_workers")
        gpu_hw, gpu_declared = has_gpu_hardware(node_type["node_config"]), resources.get("GPU", 0) >= 1
        if gpu_hw != gpu_declared:
            errors.append(f"{name}: GPU hardware={gpu_hw} but declared GPU resource={resources.get('GPU', 0)}")
        if name == head and resources.get("CPU") != 0:
            errors.append(f"{name}: the head must declare CPU: 0 so no work lands there")
    worker_types = [t for n, t in types.items() if n != head]
    if not any("prep" in t.get("resources", {}) and "GPU" not in t["resources"] for t in worker_types):
        errors.append("no CPU worker type with the custom resource `prep`")
    if not any(t.get("resources", {}).get("GPU", 0) >= 1 for t in worker_types):
        errors.append("no GPU worker type")
    return errors


# --------------------------------------------------------------------------------------------------
# KubeRay validators


def crd_to_json_schema(node: Any, strict: bool) -> Any:
    """A CRD openAPIV3Schema node as plain JSON schema.

    x-kubernetes-* extensions are dropped (list-type `set` becomes uniqueItems), `nullable` widens the
    type, int-or-string without anyOf becomes integer|string, and with `strict` every object with
    declared properties rejects unknown ones (what `kubectl apply` does by default since 1.27).
    """
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: crd_to_json_schema(sub, strict) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = crd_to_json_schema(value, strict)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [crd_to_json_schema(sub, strict) for sub in value]
        else:  # enum, default, pattern, ...: values, not schemas
            out[key] = value
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["type"] = ["integer", "string"]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if strict and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


K8S_FORMATS = jsonschema.FormatChecker()
K8S_FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
K8S_FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    crd = load_yaml((VENDORED_CRDS / CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = crd_to_json_schema(version["schema"]["openAPIV3Schema"], strict=True)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    return jsonschema.Draft202012Validator(schema, format_checker=K8S_FORMATS)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    if doc.get("kind") not in CRD_FILES:
        return [f"no vendored CRD for kind {doc.get('kind')!r}"]
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{e.json_path}: {e.message}" for e in errors)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def cluster_spec_errors(spec: dict[str, Any]) -> list[str]:
    """RayCluster spec rules from KubeRay's ValidateRayClusterSpec plus project rules."""
    errors: list[str] = []
    ray_version = pyproject_pins()["ray"]
    if spec.get("rayVersion") != ray_version:
        errors.append(f"rayVersion {spec.get('rayVersion')!r} != pinned ray {ray_version}")
    if not spec.get("enableInTreeAutoscaling"):
        errors.append("enableInTreeAutoscaling must be true")
    token_auth = spec.get("authOptions", {}).get("mode") == "token"
    if token_auth and version_tuple(str(spec.get("rayVersion", "0"))) < (2, 52, 0):
        errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
    autoscaler_v2 = spec.get("autoscalerOptions", {}).get("version") == "v2"
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        errors.append("head rayStartParams.num-cpus must be '0' so no work lands on the head")
    groups = [("head", head)] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        params, pod = group.get("rayStartParams", {}), group["template"]["spec"]
        if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & params.keys():
            errors.append(f"{name}: resources set both in rayStartParams and in the group's resources")
        if autoscaler_v2 and pod.get("restartPolicy", "Never") != "Never":
            errors.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
        if not pod.get("containers"):
            errors.append(f"{name}: no containers")
            continue
        ray_container = pod["containers"][0]
        gpus = int(ray_container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        if "num-gpus" in params and int(params["num-gpus"]) != gpus:
            errors.append(f"{name}: num-gpus {params['num-gpus']} != container nvidia.com/gpu limit {gpus}")
        if "gpu" in name and gpus < 1:
            errors.append(f"{name}: a GPU group without an nvidia.com/gpu limit")
        names = {env["name"] for env in ray_container.get("env", [])}
        if not CREDENTIAL_ENV <= names:
            errors.append(f"{name}: Ray container lacks {sorted(CREDENTIAL_ENV - names)} from the Secret")
        if name != "head":
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 0)
            if not lo <= group.get("replicas", lo) <= hi or hi < 1:
                errors.append(f"{name}: need minReplicas <= replicas <= maxReplicas and maxReplicas >= 1")
    return errors


def rayjob_spec_errors(spec: dict[str, Any]) -> list[str]:
    """RayJob rules from KubeRay's ValidateRayJobSpec / validateDeletionRules and the CRD's CEL rules
    that our manifests touch, plus project rules."""
    errors: list[str] = []
    if ("rayClusterSpec" in spec) == bool(spec.get("clusterSelector")):
        errors.append("set exactly one of rayClusterSpec and clusterSelector")
    if not str(spec.get("entrypoint", "")).startswith("python -m jobs."):
        errors.append("entrypoint must run a job module: python -m jobs.<name> ...")
    runtime_env = load_yaml(spec.get("runtimeEnvYAML", "{}")) or {}
    if not isinstance(runtime_env, dict) or not set(runtime_env) <= RuntimeEnv.known_fields:
        errors.append(f"runtimeEnvYAML is not a runtime_env mapping: {runtime_env!r}")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    rules = spec.get("deletionStrategy", {}).get("deletionRules", [])
    if rules and shutdown:
        errors.append("shutdownAfterJobFinishes and deletionStrategy.deletionRules are mutually exclusive")
    if not rules and not shutdown:
        errors.append("nothing deletes the RayCluster: set shutdownAfterJobFinishes or deletionRules")
    ttl_by_condition: dict[str, dict[str, int]] = {}
    for i, rule in enumerate(rules):
        condition = rule.get("condition", {})
        if ("jobStatus" in condition) == ("jobDeploymentStatus" in condition):
            errors.append(f"deletionRules[{i}]: set exactly one of jobStatus and jobDeploymentStatus")
        if rule.get("policy") == "DeleteWorkers" and spec.get("rayClusterSpec", {}).get("enableInTreeAutoscaling"):
            errors.append(f"deletionRules[{i}]: DeleteWorkers is not supported with autoscaling")
        key = str(condition.get("jobStatus", condition.get("jobDeploymentStatus")))
        if rule.get("policy") in ttl_by_condition.setdefault(key, {}):
            errors.append(f"deletionRules[{i}]: duplicate {rule.get('policy')} rule for {key}")
        ttl_by_condition[key][rule.get("policy", "")] = condition.get("ttlSeconds", 0)
    for key, ttls in ttl_by_condition.items():
        ordered = [ttls[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in ttls]
        if ordered != sorted(ordered):
            errors.append(f"deletion TTLs for {key} must satisfy Workers <= Cluster <= Self: {ttls}")
    if "rayClusterSpec" in spec:
        errors += cluster_spec_errors(spec["rayClusterSpec"])
    return errors


def kuberay_rule_errors(doc: dict[str, Any]) -> list[str]:
    name = doc["metadata"]["name"]
    max_len = {"RayCluster": 53, "RayJob": 47}[doc["kind"]]  # utils.MaxRayClusterNameLength / - 6
    errors = [] if re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) else [f"{name}: not a DNS-1035 label"]
    if len(name) > max_len:
        errors.append(f"{name}: longer than {max_len} characters")
    spec_check = cluster_spec_errors if doc["kind"] == "RayCluster" else rayjob_spec_errors
    return errors + spec_check(doc["spec"])


# --------------------------------------------------------------------------------------------------
# Built-in kinds, runtime_env, credentials


def builtin_errors(doc: dict[str, Any]) -> list[str]:
    """kubernetes-validate against its bundled (offline) schemas, strict: unknown fields are errors."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def cronjob_rule_errors(doc: dict[str, Any]) -> list[str]:
    """What the schema cannot say (it has no enum for concurrencyPolicy) and the project requires."""
    spec, errors = doc["spec"], []
    if spec.get("concurrencyPolicy") != "Forbid":
        errors.append(f"concurrencyPolicy {spec.get('concurrencyPolicy')!r}: must be Forbid (Allow|Forbid|Replace)")
    if not isinstance(spec.get("startingDeadlineSeconds"), int) or spec["startingDeadlineSeconds"] <= 0:
        errors.append("startingDeadlineSeconds must be a positive integer")
    for limit in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        if not isinstance(spec.get(limit), int) or spec[limit] < 0:
            errors.append(f"{limit} must be set")
    if len(str(spec.get("schedule", "")).split()) != 5:
        errors.append(f"schedule {spec.get('schedule')!r} is not a 5-field cron expression")
    if "activeDeadlineSeconds" not in spec["jobTemplate"]["spec"]:
        errors.append("jobTemplate.spec.activeDeadlineSeconds must bound a stuck run")
    return errors


def env_credential_errors(doc: dict[str, Any]) -> list[str]:
    """Credential-like env vars only as valueFrom.secretKeyRef, never as a literal value."""
    errors = []
    for container in iter_containers(doc):
        for env in container.get("env", []):
            if env["name"] in CREDENTIAL_ENV or re.search(r"SECRET|TOKEN|PASSWORD", env["name"]):
                if "value" in env or "secretKeyRef" not in env.get("valueFrom", {}):
                    errors.append(f"{container['name']}: {env['name']} must come from valueFrom.secretKeyRef")
    return errors


CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "aws_secret_access_key with a value": re.compile(
        r"(?i)aws_secret_access_key['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}"
    ),
    "secretAccessKey with a value": re.compile(r"secretAccessKey['\"]?\s*:\s*['\"]?[A-Za-z0-9/+]{8,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "service account key file": re.compile(r"\"private_key(_id)?\"\s*:"),
}


def credential_findings(text: str) -> list[str]:
    return [name for name, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]


def runtime_env_errors(runtime_env: dict[str, Any]) -> list[str]:
    """runtime_env.yaml as `ray job submit --runtime-env` reads it: known fields only (RuntimeEnv
    accepts unknown keys as plugin names, so a typo would pass silently), Ray's own type checks, the
    repository as working_dir, and no credential-like env var."""
    errors = [f"unknown runtime_env field {key!r}" for key in sorted(set(runtime_env) - RuntimeEnv.known_fields)]
    try:
        RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as exc:
        errors.append(str(exc))
    if runtime_env.get("working_dir") != ".":
        errors.append("working_dir must be '.' (the repository root, where ray job submit runs)")
    env_vars = runtime_env.get("env_vars", {})
    errors += [f"env var {k} looks like a credential" for k in env_vars if re.search(r"KEY|SECRET|TOKEN|PASSWORD", k)]
    return errors


def runtime_env_excludes(relpath: str, patterns: list[str]) -> bool:
    """Whether Ray's working_dir upload skips `relpath`: Ray matches `excludes` with its vendored
    pathspec (gitwildmatch), as in ray._private.runtime_env.packaging._get_excludes."""
    from ray._private.thirdparty.pathspec import PathSpec

    return bool(PathSpec.from_lines("gitwildmatch", patterns).match_file(relpath))


# ==================================================================================================
# Tests: Ray cluster launcher


@pytest.mark.parametrize("path", RAY_YAMLS, ids=lambda p: p.name)
def test_ray_launcher_config_is_valid(path: Path) -> None:
    config = load_yaml(path.read_text())
    assert ray_schema_errors(config) == []
    assert ray_validate_config_errors(config) == []
    assert ray_config_rule_errors(config) == []


@pytest.mark.parametrize("path", RAY_YAMLS, ids=lambda p: p.name)
def test_ray_launcher_installs_the_synced_project(path: Path) -> None:
    config = load_yaml(path.read_text())
    (remote,) = [r for r, local in config["file_mounts"].items() if local == "."]
    assert any("pip install" in cmd and f"-e {remote}" in cmd for cmd in config["setup_commands"])
    assert {"/data/", "/out/", "benchmarks/results/"} <= set(config["rsync_exclude"])


def test_ray_validators_reject_broken_configs() -> None:
    good = load_yaml(RAY_YAMLS[0].read_text())

    typo = json.loads(json.dumps(good))
    typo["idle_timeout_minute"] = typo.pop("idle_timeout_minutes")
    assert any("idle_timeout_minute" in e for e in ray_schema_errors(typo))
    assert ray_validate_config_errors(typo) != []

    fractional = json.loads(json.dumps(good))
    fractional["available_node_types"]["cpu_prep"]["resources"]["CPU"] = 0.5
    assert any("cpu_prep" in e for e in ray_schema_errors(fractional))

    too_many_min = json.loads(json.dumps(good))
    too_many_min["available_node_types"]["gpu_train"]["min_workers"] = good["max_workers"] + 1
    assert ray_schema_errors(too_many_min) == []  # only Ray's own check and ours see this
    assert any("max_workers" in e for e in ray_validate_config_errors(too_many_min))
    assert "max_workers is smaller than the sum of min_workers" in ray_config_rule_errors(too_many_min)

    no_gpu = json.loads(json.dumps(good))
    del no_gpu["available_node_types"]["gpu_train"]["resources"]["GPU"]
    assert any(e.startswith("gpu_train: GPU hardware=True") for e in ray_config_rule_errors(no_gpu))

    busy_head = json.loads(json.dumps(good))
    busy_head["available_node_types"]["head"]["resources"] = {}
    assert any("head: no resources" in e for e in ray_config_rule_errors(busy_head))


# ==================================================================================================
# Tests: KubeRay


def test_vendored_crds_are_verbatim() -> None:
    table = (VENDORED_CRDS / "README.md").read_text()
    recorded = dict(re.findall(r"\| (ray\.io_\w+\.yaml) \| ([0-9a-f]{64}) \|", table))
    assert set(recorded) == set(CRD_FILES.values())
    for name, digest in recorded.items():
        assert hashlib.sha256((VENDORED_CRDS / name).read_bytes()).hexdigest() == digest, name


def test_vendored_crds_match_shared_copy() -> None:
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} not found (expected beside the repository): drift check not possible")
    for name in CRD_FILES.values():
        assert (VENDORED_CRDS / name).read_bytes() == (SHARED_CRDS / name).read_bytes(), (
            f"{name} differs from {SHARED_CRDS}: re-copy it and update cluster_configs/kuberay/crds/README.md"
        )


def test_expected_kuberay_objects_exist() -> None:
    kinds = sorted(i.split(":")[1].split("/")[0] for i, _ in KUBERAY_DOCS)
    assert kinds == sorted(
        ["RayCluster", "RayJob", "RayJob", "RayJob", "CronJob", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"]
    )


@pytest.mark.parametrize(("doc_id", "doc"), CRD_DOCS, ids=[i for i, _ in CRD_DOCS])
def test_kuberay_manifest_matches_crd(doc_id: str, doc: dict[str, Any]) -> None:
    assert crd_errors(doc) == []
    assert kuberay_rule_errors(doc) == []
    assert env_credential_errors(doc) == []


def test_rayjob_entrypoints_are_the_documented_commands() -> None:
    entrypoints = {d["metadata"]["name"]: d["spec"]["entrypoint"] for _, d in CRD_DOCS if d["kind"] == "RayJob"}
    bucket = "s3://YOUR-BUCKET"
    assert entrypoints == {
        "secu-train-fmnist-demo": f"python -m jobs.train --recipe fashion-mnist-cpu --dataset fashion-mnist "
        f"--storage {bucket}/secu "
        "--run-id fmnist-demo",
        "secu-infer-fmnist-demo": f"python -m jobs.infer --storage {bucket}/secu --run-id fmnist-demo",
        TEMPLATE_NAME: f"python -m jobs.recluster --storage {bucket}/secu --run-id lake-recluster "
        f"--source {bucket}/incoming/",
    }


def test_kuberay_validators_reject_broken_manifests() -> None:
    cluster = find_doc("RayCluster", "raycluster.yaml")
    job = find_doc("RayJob", "rayjob-train.yaml")

    typo = json.loads(json.dumps(cluster))
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("minReplicas")
    errors = crd_errors(typo)
    assert any("'minReplica' was unexpected" in e for e in errors)
    assert any("'minReplicas' is a required property" in e for e in errors)

    wrong_type = json.loads(json.dumps(cluster))
    wrong_type["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "4"
    wrong_type["spec"]["authOptions"]["mode"] = "tokens"
    errors = crd_errors(wrong_type)
    assert any("maxReplicas" in e and "not of type 'integer'" in e for e in errors)
    assert any("authOptions.mode" in e for e in errors)

    nested_typo = json.loads(json.dumps(job))
    nested_typo["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imag"] = "x"
    assert any("'imag' was unexpected" in e for e in crd_errors(nested_typo))

    wrong_kind = json.loads(json.dumps(job))
    wrong_kind["apiVersion"] = "ray.io/v1alpha1"
    assert any("apiVersion" in e for e in crd_errors(wrong_kind))

    both = json.loads(json.dumps(job))
    both["spec"]["deletionStrategy"] = {
        "deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "ttlSeconds": 0}}]
    }
    assert crd_errors(both) == []  # schema-valid; the operator rejects it at reconcile time
    assert any("mutually exclusive" in e for e in kuberay_rule_errors(both))

    restart = json.loads(json.dumps(cluster))
    restart["spec"]["workerGroupSpecs"][1]["template"]["spec"]["restartPolicy"] = "Always"
    restart["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = "2"
    restart["metadata"]["name"] = "Secu_Ray"
    errors = kuberay_rule_errors(restart)
    assert any("restartPolicy" in e for e in errors)
    assert any("num-gpus 2 != container nvidia.com/gpu limit 1" in e for e in errors)
    assert any("DNS-1035" in e for e in errors)


def test_kuberay_credentials_come_from_a_secret() -> None:
    cluster = find_doc("RayCluster", "raycluster.yaml")
    leaked = json.loads(json.dumps(cluster))
    env = leaked["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env[1] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-secret"}
    assert env_credential_errors(leaked) == ["ray-head: AWS_SECRET_ACCESS_KEY must come from valueFrom.secretKeyRef"]
    missing = json.loads(json.dumps(cluster))
    missing["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"] = []
    assert any("cpu-prep: Ray container lacks" in e for e in kuberay_rule_errors(missing))


# ==================================================================================================
# Tests: built-in kinds (CronJob + RBAC)


@pytest.mark.parametrize(("doc_id", "doc"), BUILTIN_DOCS, ids=[i for i, _ in BUILTIN_DOCS])
def test_builtin_kind_is_valid(doc_id: str, doc: dict[str, Any]) -> None:
    assert builtin_errors(doc) == []
    assert env_credential_errors(doc) == []
    if doc["kind"] == "CronJob":
        assert cronjob_rule_errors(doc) == []


def test_builtin_validators_reject_broken_objects() -> None:
    cron = find_doc("CronJob")
    typo = json.loads(json.dumps(cron))
    typo["spec"]["concurencyPolicy"] = typo["spec"].pop("concurrencyPolicy")
    assert any("'concurencyPolicy' was unexpected" in e for e in builtin_errors(typo))

    sometimes = json.loads(json.dumps(cron))
    sometimes["spec"]["concurrencyPolicy"] = "Sometimes"
    assert any("must be Forbid" in e for e in cronjob_rule_errors(sometimes))

    bad_deadline = json.loads(json.dumps(cron))
    bad_deadline["spec"]["startingDeadlineSeconds"] = "1h"
    assert builtin_errors(bad_deadline) != []

    role = find_doc("Role")
    bad_role = json.loads(json.dumps(role))
    bad_role["rules"][0]["verb"] = bad_role["rules"][0].pop("verbs")
    assert builtin_errors(bad_role) != []


def test_cronjob_pod_runs_the_rayjob_with_least_privilege() -> None:
    cron, role, binding = find_doc("CronJob"), find_doc("Role"), find_doc("RoleBinding")
    account, configmap = find_doc("ServiceAccount"), find_doc("ConfigMap")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "watch", "delete"]}
    ]
    script = configmap["data"]["submit-and-wait.sh"]
    assert set(re.findall(r"\bkubectl (\w+)", script)) <= set(role["rules"][0]["verbs"])
    assert [v["configMap"]["name"] for v in pod["volumes"]] == [configmap["metadata"]["name"]]
    # Forbid only covers the Ray run if the RayJob's deadline expires before its wrapper Job's does.
    rayjob = embedded_rayjob(configmap)
    assert rayjob["spec"]["activeDeadlineSeconds"] < cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]


FAKE_KUBECTL = """#!{python}
import json, os, pathlib, sys
state = pathlib.Path(os.environ["FAKE_KUBECTL_STATE"])
with (state / "calls.jsonl").open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
verb = sys.argv[1]
if verb == "create":
    (state / "created.yaml").write_text(sys.stdin.read())
    error = state / "create_error"
    if error.exists():
        sys.exit(error.read_text() + "\\n")
    print("rayjob.ray.io/created")
elif verb == "get":
    statuses = json.loads((state / "statuses.json").read_text())
    if not statuses:
        sys.exit("fake kubectl: no more statuses")
    (state / "statuses.json").write_text(json.dumps(statuses[1:]))
    print(statuses[0], end="")
"""


@pytest.mark.parametrize(
    ("create_error", "statuses", "exit_code"),
    [
        (None, ["/", "Initializing/", "Running/RUNNING", "Complete/SUCCEEDED"], 0),
        (None, ["Running/RUNNING", "Complete/FAILED"], 1),
        (None, ["Failed/"], 1),
        ('Error from server (AlreadyExists): rayjobs.ray.io "x" already exists', ["Complete/SUCCEEDED"], 0),
        ("Error from server (Forbidden): rayjobs.ray.io is forbidden", [], 1),
    ],
    ids=["succeeded", "ray-job-failed", "deployment-failed", "retried-pod-attaches", "create-denied"],
)
def test_submit_and_wait_script(tmp_path: Path, create_error: str | None, statuses: list[str], exit_code: int) -> None:
    """The CronJob pod's script against a fake kubectl: exit status follows the RayJob's outcome."""
    configmap = find_doc("ConfigMap")
    (tmp_path / "bin").mkdir()
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("{python}", sys.executable))
    kubectl.chmod(0o755)
    (tmp_path / "rayjob.yaml").write_text(configmap["data"]["rayjob.yaml"])
    (tmp_path / "script.sh").write_text(configmap["data"]["submit-and-wait.sh"])
    (tmp_path / "statuses.json").write_text(json.dumps(statuses))
    if create_error:
        (tmp_path / "create_error").write_text(create_error)
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "FAKE_KUBECTL_STATE": str(tmp_path),
        "JOB_NAME": "secu-recluster-29301234",
        "RAYJOB_TEMPLATE": str(tmp_path / "rayjob.yaml"),
        "POLL_SECONDS": "0",
    }
    result = subprocess.run(["bash", str(tmp_path / "script.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == exit_code, result.stdout + result.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls[0] == ["create", "-f", "-"]
    assert len(calls) == 1 + len(statuses)  # polled until a terminal status, then stopped
    assert all(call[:3] == ["get", "rayjob", TEMPLATE_NAME] for call in calls[1:])
    created = load_yaml((tmp_path / "created.yaml").read_text())
    assert created["metadata"]["name"] == TEMPLATE_NAME
    assert crd_errors(created) == []


# ==================================================================================================
# Tests: runtime_env, image pins, credentials


def test_runtime_env_is_what_ray_accepts_and_uploads_only_code() -> None:
    runtime_env = load_yaml((CONFIGS / "runtime_env.yaml").read_text())
    assert runtime_env_errors(runtime_env) == []
    excludes = runtime_env["excludes"]
    for skipped in [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/HEAD",
        "data/datasets/fmnist/shards/shard-000000.tar",
        "out/x.parquet",
        "benchmarks/results/run.json",
        "cluster_configs/kuberay/crds/ray.io_rayjobs.yaml",
    ]:
        assert runtime_env_excludes(skipped, excludes), skipped
    for kept in [
        "pipelines/dataset/streams.py",
        "jobs/train.py",
        "secu/losses.py",
        "pyproject.toml",
        "tests/data/tiny.tar",
        "cluster_configs/runtime_env.yaml",
    ]:
        assert not runtime_env_excludes(kept, excludes), kept


def test_runtime_env_checks_reject_broken_files() -> None:
    good = load_yaml((CONFIGS / "runtime_env.yaml").read_text())
    typo = {**good, "exclude": good["excludes"]}
    del typo["excludes"]
    assert runtime_env_errors(typo) == ["unknown runtime_env field 'exclude'"]
    not_a_string = {**good, "env_vars": {"OMP_NUM_THREADS": 4}}
    assert any("must be of type Dict[str, str]" in e for e in runtime_env_errors(not_a_string))
    leaked = {**good, "env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}
    assert runtime_env_errors(leaked) == ["env var AWS_SECRET_ACCESS_KEY looks like a credential"]
    assert not runtime_env_excludes(".venv/lib/x.py", ["venv/"])  # a pattern missing its dot uploads the venv


def test_images_pin_the_project_versions() -> None:
    pins = pyproject_pins()
    ray_tag = f"rayproject/ray:{pins['ray']}-py311"
    dockerfile = (CONFIGS / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(ray_tag)}\b", dockerfile, re.MULTILINE)
    for package in ("torch", "torchvision"):
        assert f'"{package}=={pins[package]}"' in dockerfile
    assert f"[train,data,default]=={pins['ray']}" in dockerfile
    for path in RAY_YAMLS:
        assert load_yaml(path.read_text())["docker"]["image"].startswith(ray_tag), path.name


def test_no_credentials_in_cluster_configs() -> None:
    files = [p for p in CONFIGS.rglob("*") if p.is_file()]
    assert len(files) >= 10  # the walk found the configs
    findings = {str(p.relative_to(REPO)): credential_findings(p.read_text()) for p in files}
    assert {path: found for path, found in findings.items() if found} == {}


def test_credential_scan_finds_planted_secrets() -> None:
    fake_key_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    fake_secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert credential_findings(f"aws_access_key_id = {fake_key_id}") == ["AWS access key id"]
    assert credential_findings(f"aws_secret_access_key = {fake_secret}") == ["aws_secret_access_key with a value"]
    assert credential_findings(f"  secretAccessKey: {fake_secret}") == ["secretAccessKey with a value"]
    assert credential_findings('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"') == []
    assert credential_findings("-----BEGIN " + "OPENSSH PRIVATE KEY-----") == ["private key"]
