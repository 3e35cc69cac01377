"""The Dockerfile and the Makefile install the same pinned stack, and .ci/run runs the README's test command."""

from __future__ import annotations

import re

from conftest import REPO


def test_dockerfile_installs_the_makefile_requirement_files():
    make, docker = (REPO / "Makefile").read_text(), (REPO / "Dockerfile").read_text()
    for line in ("pip install -q -r requirements.txt", "pip install -q --no-deps -r requirements-data.txt",
                 "pip install -q --no-deps -e ."):
        assert line in make and line in docker, line
    pins = (REPO / "requirements.txt").read_text()
    assert "torch==2.13.0" in pins and "omegaconf==2.3.1" in pins and "bitsandbytes==" in pins
    assert re.search(r"^USER lorafit$", docker, re.M)  # not root


def test_ci_runs_the_readme_test_command():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make run" in readme
    assert ci.strip().splitlines()[-1] == "make test"
