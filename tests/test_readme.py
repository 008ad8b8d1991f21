"""The README's examples, run as written against a real server (tiny model, trainer-made
checkpoint) on 127.0.0.1: every ``curl`` line, every ``client`` and ``trainer info/export/nest``
command, and every Python block. What is substituted is listed in ``substitutions`` (the port,
the demo paths, the bench schedule's length); a block that needs what a test cannot have (a GPU,
Docker, a dataset from the hub, hours of training) is listed in ``NOT_RUN`` with the test that
covers it instead. A new example that matches neither fails the test: the README cannot grow an
example nobody runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, ServerProcess

README = REPO / "README.md"
NOT_RUN = {  # command prefix → why not here, and what covers it
    "make ": "the Makefile targets: CI runs `make test`; `make run` is the demo (tests/test_train.py)",
    "pip install": "installation",
    "trainer train": "minutes of training on the real model: tests/test_train.py runs the same flags on the tiny one",
    "torchrun": "several processes: tests/test_train.py::test_ddp*",
    "trainer eval": "a GSM8K eval of trained checkpoints: tests/test_evaluate.py",
    "server --model": "the server itself: started here by ServerProcess with the same flags",
    "docker": "no Docker engine here: tests/test_deploy.py lints the Dockerfile and compose file",
    "kubectl": "no cluster: tests/test_deploy.py validates the manifests",
    "lm_eval": "needs the gsm8k dataset from the hub: tests/test_real_clients.py runs lm_eval on local tasks",
}


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, body) of every fenced block in ``lang``."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def commands() -> list[str]:
    """Every shell command of the bash blocks, continuation lines joined, comments dropped."""
    out = []
    for _, body in blocks("bash"):
        for cmd in body.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


@pytest.fixture(scope="module")
def env(tiny_model_dir, tiny_checkpoint, tmp_path_factory):
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint)).wait_ready()
    yield {"url": srv.url, "model": str(tiny_model_dir), "ckpt": str(tiny_checkpoint),
           "tmp": tmp_path_factory.mktemp("readme")}
    srv.stop()


def substitute(text: str, env: dict) -> str:
    for old, new in substitutions(env):
        text = text.replace(old, new)
    return text


def substitutions(env: dict) -> list[tuple[str, str]]:
    tmp = env["tmp"]
    return [("http://127.0.0.1:8000", env["url"]), ("localhost:8000", env["url"]),
            ("runs/gsm8k-mat64", env["ckpt"]), ("runs/demo", env["ckpt"]), ("smollm2-135m", env["model"]),
            ("runs/mat64-r8", str(tmp / "mat64-r8")), ("path/to/peft-lora", str(tmp / "mat64-r8")),
            ("runs/nested", str(tmp / "nested")), ("runs/bench", str(tmp / "bench")),
            ('--schedule "2:30,8:30,2:30"', '--schedule "2:2,4:2"')]  # 90 s of load → 4 s


def run(cmd: str, env: dict) -> subprocess.CompletedProcess:
    cmd = re.sub(r"\s\[[^\]]*\]", "", substitute(cmd, env))  # optional parts, [--flag VALUE]
    argv = shlex.split(cmd)
    if argv[0] in ("client", "trainer"):
        argv = [sys.executable, "-m", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=env["tmp"],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MLORA_URL": env["url"]})


def test_every_shell_example_runs_or_says_what_covers_it(env):
    ran = []
    for cmd in commands():
        if any(cmd.startswith(p) for p in NOT_RUN):
            continue
        assert cmd.split()[0] in ("curl", "client", "trainer"), f"README example nobody runs: {cmd!r}"
        if cmd.startswith("trainer export"):
            assert not Path(substitute("runs/mat64-r8", env)).exists()
        proc = run(cmd, env)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        ran.append(cmd.split()[0:2])
        if cmd.startswith("curl"):  # served at the rank it asked for
            argv = shlex.split(cmd)
            asked = json.loads(argv[argv.index("-d") + 1])
            assert "text" in json.loads(proc.stdout) and json.loads(proc.stdout)["rank"] == asked["rank"], proc.stdout
    assert ["curl", "-s"] in ran and ["client", "bench"] in ran and ["trainer", "nest"] in ran
    report = Path(substitute("runs/bench", env)) / "report.json"
    assert report.exists()


def test_every_python_example_runs(env):
    found = blocks("python")
    assert len(found) >= 3
    for line, body in found:
        code = substitute(body, env)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, f"README.md:{line}\n{code}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("cli, argv", [
    ("server", []), ("trainer", []), ("trainer", ["train"]), ("trainer", ["info"]), ("trainer", ["eval"]),
    ("trainer", ["export"]), ("trainer", ["nest"]), ("client", []), ("client", ["generate"]),
    ("client", ["ranks"]), ("client", ["bench"]),
])
def test_every_command_prints_its_help(cli, argv, capsys):
    """A stranger's first command. (``server --help`` once died on a ``%`` in one option's help.)"""
    import importlib

    parser = importlib.import_module(f"{cli}.cli").build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*argv, "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
