"""Refresh the schemas that tests/test_deploy_manifests.py validates deploy/*.yaml against.

    python deploy/schemas/update.py --kuberay-git /path/to/kuberay/.git [--kuberay-tag v1.7.0]
        [--kubernetes 1.33.0]

Writes, under deploy/schemas/:

- kuberay/<tag>/ray.io_{rayjobs,rayclusters,raycronjobs}.yaml: byte for byte the CRDs of
  github.com/ray-project/kuberay at that tag (ray-operator/config/crd/bases/);
- kubernetes/v<version>/: the strict JSON schemas (additionalProperties: false, as the API
  server's strict field validation) of CronJob, Job and Pod that the PyPI package
  `kubernetes-validate` bundles (pip install kubernetes-validate; it need not stay installed),
  with `_definitions.json` cut to the definitions those three reach;
- ray/<version>/ray-schema.json: the cluster launcher's schema from the installed Ray;
- sources.json: every file's source, version and sha256 (the test checks the files against
  it, so a hand edit shows).

Nothing here reaches the network; the test suite never runs this.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
CRDS = ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml", "ray.io_raycronjobs.yaml")
CRD_DIR = "ray-operator/config/crd/bases"
K8S_KINDS = ("cronjob-batch-v1.json", "job-batch-v1.json", "pod-v1.json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def kuberay(git_dir: str, tag: str) -> list[dict]:
    commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-list", "-n1", tag],
                            check=True, capture_output=True, text=True).stdout.strip()
    out = HERE / "kuberay" / tag
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in CRDS:
        data = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{tag}:{CRD_DIR}/{name}"],
                              check=True, capture_output=True).stdout
        (out / name).write_bytes(data)
        rows.append({"file": f"kuberay/{tag}/{name}",
                     "source": f"https://github.com/ray-project/kuberay/blob/{tag}/{CRD_DIR}/{name}",
                     "version": f"KubeRay {tag} (commit {commit})",
                     "git_blob": _git_blob_id(data), "sha256": _sha256(data),
                     "license": "Apache-2.0"})
    return rows


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def kubernetes(version: str) -> list[dict]:
    import importlib.metadata

    import kubernetes_validate

    pkg_version = importlib.metadata.version("kubernetes-validate")
    src = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / \
        f"v{version}-local-strict"
    out = HERE / "kubernetes" / f"v{version}"
    out.mkdir(parents=True, exist_ok=True)
    defs_doc = json.loads((src / "_definitions.json").read_text())
    defs = defs_doc["$defs"]
    todo, keep = [], set()
    rows = []
    for name in K8S_KINDS:
        data = (src / name).read_bytes()
        (out / name).write_bytes(data)
        todo += list(_refs(json.loads(data)))
        rows.append({"file": f"kubernetes/v{version}/{name}", "sha256": _sha256(data)})
    while todo:
        key = todo.pop().split("/$defs/", 1)[1]
        if key not in keep:
            keep.add(key)
            todo += list(_refs(defs[key]))
    cut = dict(defs_doc, **{"$defs": {k: defs[k] for k in sorted(keep)}})
    data = (json.dumps(cut, indent=1, sort_keys=True) + "\n").encode()
    (out / "_definitions.json").write_bytes(data)
    rows.append({"file": f"kubernetes/v{version}/_definitions.json", "sha256": _sha256(data),
                 "note": f"the {len(keep)} definitions of {len(defs)} that the three kinds reach"})
    for r in rows:
        r.update(source=f"https://pypi.org/project/kubernetes-validate/{pkg_version}/ "
                        f"(kubernetes_validate/kubernetes-json-schema/v{version}-local-strict/), "
                        "generated from Kubernetes' OpenAPI spec",
                 version=f"Kubernetes v{version}; kubernetes-validate {pkg_version}",
                 license="Apache-2.0 (Kubernetes' API definitions; kubernetes-validate)")
    return rows


def ray_launcher() -> list[dict]:
    import ray

    data = (Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_bytes()
    out = HERE / "ray" / ray.__version__
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray-schema.json").write_bytes(data)
    return [{"file": f"ray/{ray.__version__}/ray-schema.json",
             "source": f"https://github.com/ray-project/ray/blob/ray-{ray.__version__}/"
                       "python/ray/autoscaler/ray-schema.json (the ray wheel's copy)",
             "version": f"Ray {ray.__version__}", "sha256": _sha256(data),
             "license": "Apache-2.0"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kuberay-git", required=True, help="a kuberay clone's git directory")
    ap.add_argument("--kuberay-tag", default="v1.7.0")
    ap.add_argument("--kubernetes", default="1.33.0")
    args = ap.parse_args()
    rows = kuberay(args.kuberay_git, args.kuberay_tag) + kubernetes(args.kubernetes) + \
        ray_launcher()
    (HERE / "sources.json").write_text(json.dumps({"files": rows}, indent=1) + "\n")
    for r in rows:
        print(r["file"], r["sha256"][:12])


if __name__ == "__main__":
    main()
