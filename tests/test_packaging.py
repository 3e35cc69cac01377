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


def test_dockerfile_copies_what_exists_and_its_entrypoint_runs_the_cli():
    """The image can't be built here (no container engine): check what can be checked without one, and that the
    README says the image itself was not built."""
    docker = (REPO / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+) \S+$", docker, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which is not in the repo"
    assert 'ENTRYPOINT ["python", "-m", "lorafit"]' in docker and (REPO / "lorafit" / "__main__.py").is_file()
    assert "The image has not been built" in (REPO / "README.md").read_text()


def test_gpu_check_dry_run_composes_every_step(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    names = ["bf16_lora", "qlora_nf4", "packing_sdpa", "packing_flash", "accelerate_1gpu", "throughput"]
    assert [l.split()[1] for l in out.stdout.splitlines() if l.startswith("ok ")] == names
    assert "gpu-check:" in (REPO / "Makefile").read_text()


def test_ci_runs_the_readme_test_command():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make run" in readme
    assert ci.strip().splitlines()[-1] == "make test"


def test_the_import_graph_has_no_cycle():
    """Every lorafit import, lazy ones inside functions included: a run flows CLI -> config -> build -> train ->
    hooks, and shared pieces (errors, metrics) are leaves, so no module needs another that needs it back."""
    import ast

    modules = {".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f
               for f in (REPO / "lorafit").rglob("*.py")}
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorafit"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in modules and n not in (m, "lorafit")}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", " -> ".join(path + [n])  # back to a module still being visited
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
