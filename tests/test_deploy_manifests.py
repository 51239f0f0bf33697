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

The schemas live in deploy/schemas/ (sources and digests in sources.json); nothing here needs
the network or kubectl. The helpers are in tests/deploy_checks.py;
tests/test_deploy_dockerfile.py parses deploy/Dockerfile, and tests/test_deploy_live.py starts
a real `ray start --head` with token authentication and submits the RayJob's entrypoint and
the CronJob's script to it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_checks import (
    DEPLOY,
    GPU,
    RAY_SCHEMA,
    RAY_VERSION,
    ROOT,
    S3_SECRET,
    SCHEMAS,
    _quantity,
    _yaml_docs,
    cluster_spec,
    crd_schema,
    cronjob_container,
    cronjob_env,
    cronjob_words,
    job_spec,
    launcher,
    manifests,
    one,
    overrides,
    pod_templates,
    ray_container,
    ray_groups,
    validate,
    version,
)


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


