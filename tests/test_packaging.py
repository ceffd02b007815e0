"""pyproject.toml: the project installs as a package with a working `framepack` command.

Installed into a new virtual environment, without downloading anything: the dependencies are this
environment's (made visible to the new one by a .pth file), the build uses this environment's
setuptools (--no-build-isolation), and the build runs on a copy of the project so that the
checkout gets no build/ or *.egg-info folders.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("generate", "resume", "tiny-models", "bench", "bench-long")

pytestmark = pytest.mark.slow


def _run(command: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A new virtual environment with the project installed from a copy of it; returns its bin folder."""
    pytest.importorskip("setuptools", reason="the build uses this environment's setuptools")
    pytest.importorskip("packaging", reason="packaging reads the declared requirements")
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "requirements-dev.txt", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "diffusers_helper", source / "diffusers_helper", ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    done = _run([sys.executable, "-m", "venv", "--without-pip", venv], root)
    assert done.returncode == 0, done.stderr
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    # This environment's packages (pip, setuptools, torch, ...) come after the new environment's own.
    Path(purelib, "_outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", source], root, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return python.parent


def test_the_framepack_command_runs_the_cli(installed, tmp_path):
    framepack = installed / ("framepack.exe" if os.name == "nt" else "framepack")
    assert framepack.is_file(), sorted(p.name for p in installed.iterdir())
    done = _run([framepack, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in SUBCOMMANDS), done.stdout
    done = _run([framepack, "generate", "--help"], tmp_path)
    assert done.returncode == 0 and "--image" in done.stdout and "--prompt" in done.stdout, done.stdout + done.stderr
    # a mistake is the CLI's one-line error and status 2, as with python -m diffusers_helper
    done = _run([framepack, "generate"], tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_installed_copy_is_imported_not_the_checkout(installed, tmp_path):
    python = installed / ("python.exe" if os.name == "nt" else "python")
    script = ("import importlib.metadata, json, diffusers_helper, diffusers_helper.__main__ as cli; "
              "print(json.dumps([diffusers_helper.__file__, cli.__file__, diffusers_helper.__version__, "
              "importlib.metadata.version('framepack'), importlib.metadata.requires('framepack')]))")
    done = _run([python, "-c", script], tmp_path)
    assert done.returncode == 0, done.stderr
    package, cli, version, installed_version, requires = json.loads(done.stdout)
    venv = installed.parent.resolve()
    for path in (package, cli):
        assert Path(path).resolve().is_relative_to(venv) and not Path(path).resolve().is_relative_to(REPO), path
    assert version == installed_version
    # the dependencies are requirements.txt's, and the test requirements are the dev extra
    from packaging.requirements import Requirement

    def listed(name: str) -> set[str]:
        lines = (REPO / name).read_text().splitlines()
        return {str(Requirement(line)) for line in lines if line.strip() and not line.lstrip().startswith("#")}

    declared = [Requirement(r) for r in requires]
    assert {str(r) for r in declared if r.marker is None} == listed("requirements.txt")
    assert {str(Requirement(f"{r.name}{r.specifier}")) for r in declared if r.marker} == listed("requirements-dev.txt")
    # every module of the checkout's package, subpackages included, was installed
    def modules(folder: Path) -> set[str]:
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}

    assert modules(Path(package).parent) == modules(REPO / "diffusers_helper")
    done = _run([python, "-m", "diffusers_helper", "--help"], tmp_path)
    assert done.returncode == 0 and "generate" in done.stdout, done.stderr
