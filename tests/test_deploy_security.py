"""The shipped manifests expose no unauthenticated Ray endpoint."""

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _docs():
    for f in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict):
                yield f.name, doc


def test_ray_clusters_require_token_auth():
    seen = 0
    for name, doc in _docs():
        spec = doc.get("spec") or {}
        cluster = spec.get("rayClusterSpec") if doc.get("kind") == "RayJob" else (
            spec if doc.get("kind") == "RayCluster" else None)
        if cluster is None:
            continue
        seen += 1
        assert (cluster.get("authOptions") or {}).get("mode") == "token", name
    assert seen, "no RayJob/RayCluster manifest found"


def test_no_dashboard_bound_to_all_interfaces_without_auth():
    for name, doc in _docs():
        text = yaml.safe_dump(doc)
        if "0.0.0.0" in text:
            spec = doc.get("spec") or {}
            cluster = spec.get("rayClusterSpec") or spec
            assert (cluster.get("authOptions") or {}).get("mode") == "token", name
