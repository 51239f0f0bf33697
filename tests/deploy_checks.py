"""What the deploy/ tests share: the recorded schemas (KubeRay CRDs, Kubernetes, Ray's
cluster launcher), strict validation against them, the rules KubeRay's operator checks that a
schema cannot, and readers of the shipped manifests. See tests/test_deploy_manifests.py."""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
KUBERAY = SCHEMAS / "kuberay" / "v1.7.0"
K8S = SCHEMAS / "kubernetes" / "v1.33.0"
RAY_SCHEMA = SCHEMAS / "ray" / "2.60.0" / "ray-schema.json"  # refresh with the lock's ray
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"
RAY = str(Path(sys.executable).with_name("ray"))
# The Ray the suite runs with is the lock's (make setup installs it); the schema folder and the
# image's pins must name the same release.
RAY_VERSION = next(ln.split("==")[1] for ln in (ROOT / "requirements.lock").read_text().splitlines()
                   if ln.startswith("ray=="))
S3_SECRET = "hwq-s3-credentials"
GPU = "nvidia.com/gpu"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def manifests() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document of deploy/*.yaml."""
    return [(p.name, d) for p in sorted(DEPLOY.glob("*.yaml")) for d in _yaml_docs(p)]


def one(kind: str) -> dict:
    docs = [d for _, d in manifests() if d.get("kind") == kind]
    assert len(docs) == 1, f"expected one {kind} in deploy/, found {len(docs)}"
    return docs[0]


def launcher() -> dict:
    return yaml.load((DEPLOY / "cluster.yaml").read_text(), Loader=_Loader)


def version() -> str:
    """pyproject.toml's project version (read without tomllib: Python 3.10 has none)."""
    m = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert m, "no version in pyproject.toml"
    return m.group(1)


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------


def _strict(node: Any) -> Any:
    """A CRD schema with unknown fields refused: every object that lists its properties (and
    does not preserve unknown fields) gets additionalProperties: false."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}


@cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load((KUBERAY / CRD_FILES[kind]).read_text(), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    served = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served")]
    assert served, f"{kind}: ray.io/v1 is not served by the CRD"
    schema = _strict(served[0]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"$ref": f"{K8S_DEFS}#/$defs/"
                                                "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata",
                                 "spec"})
    return schema


@cache
def k8s_registry() -> Registry:
    resources = [Resource.from_contents(json.loads(p.read_text())) for p in K8S.glob("*.json")]
    return Registry().with_resources((r.id(), r) for r in resources)


def k8s_kind_schema(kind: str, api_version: str) -> dict:
    group_version = api_version.replace("/", "-") if "/" in api_version else api_version
    path = K8S / f"{kind.lower()}-{group_version}.json"
    assert path.exists(), f"no schema for {api_version} {kind} in {K8S}"
    return json.loads(path.read_text())


def _errors(schema: dict, doc: Any) -> list[str]:
    v = jsonschema.Draft202012Validator(schema, registry=k8s_registry())
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


POD_TEMPLATE = {"$ref": f"{K8S_DEFS}#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}


def validate(doc: dict) -> list[str]:
    """Every problem with one manifest document, as lines (empty: valid)."""
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind is None and "cluster_name" in doc:
        return validate_launcher(doc)
    if api == "ray.io/v1" and kind in CRD_FILES:
        errs = _errors(crd_schema(kind), doc)
        for where, tmpl in pod_templates(doc):
            errs += [f"{where}: {e}" for e in _errors(POD_TEMPLATE, tmpl)]
        return errs + kuberay_rules(doc)
    if api == "batch/v1" and kind == "CronJob":
        return _errors(k8s_kind_schema(kind, api), doc)
    return [f"unknown kind {api} {kind}: add its schema to deploy/schemas and here"]


def validate_launcher(config: dict) -> list[str]:
    schema = json.loads(RAY_SCHEMA.read_text())
    v = jsonschema.Draft7Validator(schema)
    errs = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in v.iter_errors(config)]
    if errs:
        return errs
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # noqa: BLE001 - Ray's own checks: any error is a finding
        return [f"ray: {e}"]
    return []


# ---------------------------------------------------------------------------------------------
# KubeRay's own checks (ray-operator/controllers/ray/utils/validation.go at v1.7.0): what the
# operator refuses after the API server accepted the object.
# ---------------------------------------------------------------------------------------------

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_NAME_MAX = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}


def _version_tuple(v: str) -> tuple[int, ...]:
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?.*", v)
    if not m:
        raise ValueError(v)
    return tuple(int(x or 0) for x in m.groups())


def cluster_rules(spec: dict, in_rayjob: bool) -> list[str]:
    errs = []
    head = spec["headGroupSpec"]
    groups = [("head", head)] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for name, g in groups:
        if not g["template"].get("spec", {}).get("containers"):
            errs.append(f"{name}: the pod template has no container")
        params = g.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) \
                and g.get("resources"):
            errs.append(f"{name}: resources in both rayStartParams and resources")
        if "labels" in params:
            errs.append(f"{name}: rayStartParams['labels'] is not supported")
        if name == "head":
            continue
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errs.append(f"worker group {name}: minReplicas and maxReplicas are needed "
                        "without autoscaling")
        if lo is not None and hi is not None and lo > hi:
            errs.append(f"worker group {name}: minReplicas > maxReplicas")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        rv = spec.get("rayVersion")
        if not rv:
            errs.append("authOptions.mode is 'token' but rayVersion is not set (>= 2.52.0)")
        elif _version_tuple(rv) < (2, 52, 0):
            errs.append(f"authOptions.mode is 'token' but rayVersion {rv} < 2.52.0")
    if auth.get("enableK8sTokenAuth"):
        if auth.get("mode") != "token":
            errs.append("authOptions.enableK8sTokenAuth without mode token")
        if in_rayjob:
            errs.append("K8s token auth is not supported for RayJob")
    return errs


def rayjob_rules(spec: dict) -> list[str]:
    errs = []
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if spec.get("suspend") and not shutdown:
        errs.append("suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        errs.append("ttlSecondsAfterFinished < 0")
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errs.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    if shutdown and (spec.get("deletionStrategy") or {}).get("deletionRules"):
        errs.append("shutdownAfterJobFinishes and deletionStrategy.deletionRules together")
    if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        errs.append("neither rayClusterSpec nor clusterSelector")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
        errs.append(f"submissionMode {mode!r}")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errs.append("backoffLimit with InteractiveMode")
    if mode == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec:
            errs.append("SidecarMode takes no submitterPodTemplate/submitterConfig")
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        if not isinstance(env, dict):
            errs.append("runtimeEnvYAML is not a mapping")
    except yaml.YAMLError as e:
        errs.append(f"runtimeEnvYAML: {e}")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            errs.append(f"{key} must be positive")
    if spec.get("backoffLimit", 0) < 0:
        errs.append("backoffLimit < 0")
    if "rayClusterSpec" in spec:
        errs += cluster_rules(spec["rayClusterSpec"], in_rayjob=True)
    return errs


def _cron_ok(schedule: str) -> bool:
    if schedule.startswith("@"):
        return schedule in ("@yearly", "@annually", "@monthly", "@weekly", "@daily",
                            "@midnight", "@hourly") or schedule.startswith("@every ")
    fields = schedule.split()
    return len(fields) == 5 and all(re.fullmatch(r"[\d*/,\-A-Za-z?]+", f) for f in fields)


def kuberay_rules(doc: dict) -> list[str]:
    kind, spec, name = doc["kind"], doc.get("spec") or {}, doc["metadata"].get("name", "")
    errs = []
    if len(name) > _NAME_MAX[kind] or not _DNS1035.fullmatch(name):
        errs.append(f"metadata.name {name!r}: a DNS-1035 label of at most {_NAME_MAX[kind]}")
    if kind == "RayCluster":
        errs += cluster_rules(spec, in_rayjob=False)
    elif kind == "RayJob":
        errs += rayjob_rules(spec)
    elif kind == "RayCronJob":
        if "TZ" in spec["schedule"] or not _cron_ok(spec["schedule"]):
            errs.append(f"schedule {spec['schedule']!r}")
        if "timeZone" in spec:
            import zoneinfo

            try:
                zoneinfo.ZoneInfo(spec["timeZone"])
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                errs.append(f"timeZone {spec['timeZone']!r}")
        errs += [f"jobTemplate: {e}" for e in rayjob_rules(spec["jobTemplate"])]
    return errs


# ---------------------------------------------------------------------------------------------
# Walking the manifests
# ---------------------------------------------------------------------------------------------


def cluster_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayCronJob": (spec.get("jobTemplate") or {}).get("rayClusterSpec")}.get(
        doc.get("kind"))


def job_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    return {"RayJob": spec, "RayCronJob": spec.get("jobTemplate")}.get(doc.get("kind"))


def ray_groups(doc: dict) -> list[tuple[str, dict]]:
    """("head" or the group name, group) of a document's Ray cluster."""
    c = cluster_spec(doc)
    if c is None:
        return []
    return [("head", c["headGroupSpec"])] + [(g["groupName"], g)
                                             for g in c.get("workerGroupSpecs", [])]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    out = [(f"{name} template", g["template"]) for name, g in ray_groups(doc)]
    js = job_spec(doc)
    if js and "submitterPodTemplate" in js:
        out.append(("submitterPodTemplate", js["submitterPodTemplate"]))
    return out


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def _quantity(q: Any) -> float:
    s = str(q)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti)?", s)
    assert m, f"unexpected quantity {q!r}"
    n = float(m.group(1))
    return n / 1000 if m.group(2) == "m" else n * {None: 1, "Ki": 2**10, "Mi": 2**20,
                                                    "Gi": 2**30, "Ti": 2**40}[m.group(2)]


def overrides(words: list[str]) -> dict[str, str]:
    """{key: value} of the `--set key=value` arguments of a command line."""
    return dict(words[i + 1].split("=", 1) for i, w in enumerate(words[:-1]) if w == "--set")


def cronjob_container() -> dict:
    return one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def cronjob_env() -> dict[str, dict]:
    return {e["name"]: e for e in cronjob_container()["env"]}


def cronjob_words() -> list[str]:
    """The batch command the CronJob's script submits, its variables expanded."""
    env = {k: e.get("value", "") for k, e in cronjob_env().items()}
    script = cronjob_container()["args"][0]
    m = re.search(r"-- \\\n\s*(python .*?) &\n", script)
    assert m, "the CronJob's script does not submit `python ...`"
    return shlex.split(re.sub(r'"?\$(\w+)"?', lambda v: env.get(v.group(1), v.group(0)),
                              m.group(1)))


# ---------------------------------------------------------------------------------------------
# The schemas themselves
# ---------------------------------------------------------------------------------------------


