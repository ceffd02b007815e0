"""run.bat, update.bat and environment.bat, run by Wine's cmd from a folder with spaces, brackets,
an ampersand and a non-ASCII letter in its path, and started from another directory, as Explorer does.

python.exe, py.exe and git.exe are stand-ins (tests/fixtures/launcher/stub.c, built with
mingw-w64) that record how they were called, and exit as the test asks.

Needs Debian's packages wine, wine64 and gcc-mingw-w64-x86-64; skipped, saying so, without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STUB_SOURCE = REPO / "tests" / "fixtures" / "launcher" / "stub.c"
FOLDER_NAME = "Frame Pack (1) ü&co"
MINGW = "x86_64-w64-mingw32-gcc"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("wine") is None, reason="Wine is not installed (apt-get install wine wine64)"),
    pytest.mark.skipif(shutil.which(MINGW) is None, reason=f"{MINGW} is not installed (apt-get install gcc-mingw-w64-x86-64)"),
]


def windows_path(path: Path) -> str:
    """Wine shows the Linux root as drive Z:."""
    return "Z:" + str(path).replace("/", "\\")


class Wine:
    """A private Wine prefix, headless and quiet, and the stand-in program."""

    def __init__(self, root: Path):
        self.root = root
        self.prefix = root / "prefix"
        self.stub = root / "stub.exe"
        subprocess.run([MINGW, "-municode", "-O1", "-s", "-Wall", "-o", str(self.stub), str(STUB_SOURCE), "-lshell32"], check=True, timeout=120)
        self.base_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(root),
            "WINEPREFIX": str(self.prefix),
            "WINEDEBUG": "-all",
            "DISPLAY": "",  # no X: Wine must not try to open windows
            "WINEDLLOVERRIDES": "mscoree,mshtml=",  # and must not offer to install Mono or Gecko
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        # The first start creates the prefix (a few seconds). A wineserver that stays up between runs
        # makes each run take a fraction of a second instead of three. Wine's background services
        # (started by the first run) then stay up too, holding whatever output they inherited, so
        # they are started here with none, and runs write to a file rather than a pipe.
        self.wineserver = shutil.which("wineserver") or "/usr/lib/wine/wineserver"
        quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["wine", "cmd", "/c", "exit", "0"], env=self.base_env, timeout=300, check=True, **quiet)
        subprocess.run([self.wineserver, "-p"], env=self.base_env, timeout=60, **quiet)
        subprocess.run(["wine", "cmd", "/c", "exit", "0"], env=self.base_env, timeout=300, check=True, **quiet)

    def close(self):
        """Stop this prefix's wineserver (and only it), and delete the prefix (about 700 MB)."""
        subprocess.run([self.wineserver, "-k"], env=self.base_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(self.prefix, ignore_errors=True)


@pytest.fixture(scope="session")
def wine(tmp_path_factory):
    instance = Wine(tmp_path_factory.mktemp("wine"))
    yield instance
    instance.close()


class App:
    """An unpacked FramePack folder holding the three scripts, and the calls the stand-ins record."""

    def __init__(self, wine: Wine, parent: Path, portable_python=True, portable_git=True):
        self.wine = wine
        self.home = parent / FOLDER_NAME
        self.home.mkdir(parents=True)
        for name in ("run.bat", "update.bat", "environment.bat"):
            shutil.copy(REPO / name, self.home / name)
        if portable_python:
            self.add_stub("system/python/python.exe")
        if portable_git:
            self.add_stub("system/git/cmd/git.exe")
        self.record = parent / "calls.jsonl"
        self.elsewhere = parent / "elsewhere"
        self.elsewhere.mkdir()

    def add_stub(self, relative: str, base: Path | None = None) -> Path:
        target = (base or self.home) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.wine.stub, target)
        return target

    def win(self, relative: str = "") -> str:
        return windows_path(self.home / relative if relative else self.home)

    def run(self, script: str, *args: str, env: dict | None = None) -> tuple[int, str]:
        """Start a script the way a double-click does, from another directory; stdin is closed, so pause returns at once."""
        full_env = {**self.wine.base_env, "STUB_LOG": windows_path(self.record), **(env or {})}
        output = self.record.with_name("output.txt")
        with open(output, "wb") as out:
            done = subprocess.run(
                ["wine", self.win(script), *args], cwd=self.elsewhere, env=full_env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=180,
            )
        # Wine's cmd writes in the ANSI code page, cp1252 for this locale.
        return done.returncode, output.read_bytes().decode("cp1252", errors="replace").replace("\r\n", "\n")

    def calls(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text(encoding="utf-8").splitlines()]


def env_of(call: dict) -> dict:
    return {name.upper(): value for name, value in call["env"].items()}


@pytest.fixture
def app(wine, tmp_path):
    return App(wine, tmp_path)


def test_run_bat_starts_the_launcher_with_the_portable_python(app):
    code, out = app.run("run.bat", "--port", "7861", "two words")
    assert code == 0, out
    assert "not recognized" not in out and "Can't recognize" not in out
    (call,) = app.calls()
    assert call["exe"] == app.win("system\\python\\python.exe")
    assert call["argv"][1:] == [app.win("diffusers_helper\\launcher.py"), "run", "--port", "7861", "two words"]
    assert call["cwd"].rstrip("\\").lower() == app.win().lower()  # run.bat moved to its own folder
    env = env_of(call)
    assert env["FRAMEPACK_HOME"] == app.win()
    assert env["HF_HOME"] == app.win("hf_download")
    assert env["PIP_CACHE_DIR"] == app.win("cache\\pip")
    assert env["TEMP"] == env["TMP"] == app.win("temp")
    assert env["GRADIO_TEMP_DIR"] == app.win("temp\\gradio")
    assert (env["PYTHONUTF8"], env["PYTHONIOENCODING"], env["PYTHONNOUSERSITE"]) == ("1", "utf-8", "1")
    path = env["PATH"].split(";")
    assert path[:3] == [app.win("system\\python"), app.win("system\\python\\Scripts"), app.win("system\\git\\cmd")]
    assert (app.home / "temp").is_dir()


def test_run_bat_failure_keeps_the_window_open_and_says_where_the_log_is(app):
    code, out = app.run("run.bat", env={"STUB_EXIT": "6", "STUB_SAY": "ERROR: The NVIDIA driver 566.36 is too old for NVIDIA GeForce RTX 5090"})
    assert code == 1
    assert "ERROR: The NVIDIA driver 566.36 is too old" in out
    assert "FramePack stopped because of the error above." in out
    assert f'The log files are in "{app.win("logs")}"' in out
    assert "Press any key to continue" in out


def test_run_bat_without_any_python_explains_what_to_install(wine, tmp_path):
    app = App(wine, tmp_path, portable_python=False)
    code, out = app.run("run.bat")
    assert code == 1 and app.calls() == []
    assert "FramePack needs Python 3.10 to 3.13, and none was found." in out
    assert 'tick "Add python.exe to PATH"' in out
    portable = app.win("system\\python")
    assert f'Or put a portable Python in "{portable}".' in out
    assert "no log was written because Python could not start" in out
    assert "Press any key to continue" in out


def test_run_bat_uses_the_py_launcher_for_an_installed_python(wine, tmp_path):
    app = App(wine, tmp_path, portable_python=False, portable_git=False)
    bin_dir = tmp_path / "bin"
    app.add_stub("py.exe", bin_dir)
    # Python 3.12 is "not installed": the py launcher fails for -3.12, so 3.11 is next.
    code, out = app.run("run.bat", "--share", env={"WINEPATH": windows_path(bin_dir), "STUB_RULES": "-3.12 =1"})
    assert code == 0, out
    assert [call["argv"] for call in app.calls()] == [
        ["py", "-3.12", "-c", "import sys"],
        ["py", "-3.11", "-c", "import sys"],
        ["py", "-3.11", app.win("diffusers_helper\\launcher.py"), "run", "--share"],
    ]
    assert app.win("system\\git\\cmd") not in env_of(app.calls()[-1])["PATH"]


def test_run_bat_skips_a_python_on_path_that_is_not_a_real_one(wine, tmp_path):
    # The Microsoft Store's python.exe stand-in fails every command; a real Python 3.10-3.13 passes the check.
    app = App(wine, tmp_path, portable_python=False)
    bin_dir = tmp_path / "bin"
    app.add_stub("python.exe", bin_dir)
    code, out = app.run("run.bat", env={"WINEPATH": windows_path(bin_dir), "STUB_EXIT": "9009"})
    assert code == 1 and "FramePack needs Python 3.10 to 3.13" in out
    assert [call["argv"][1] for call in app.calls()] == ["-c"]
    code, out = app.run("run.bat", env={"WINEPATH": windows_path(bin_dir)})
    assert code == 0, out
    assert app.calls()[-1]["argv"] == ["python", app.win("diffusers_helper\\launcher.py"), "run"]


def test_user_bat_and_a_preset_hf_home_are_respected(app):
    (app.home / "user.bat").write_bytes(b'@echo off\r\nset "FRAMEPACK_ARGS=--hunyuan "D:\\my models\\HunyuanVideo""\r\n')
    code, out = app.run("run.bat", env={"HF_HOME": "D:\\hf"})
    assert code == 0, out
    env = env_of(app.calls()[0])
    assert env["HF_HOME"] == "D:\\hf"
    assert env["FRAMEPACK_ARGS"] == '--hunyuan "D:\\my models\\HunyuanVideo"'


def test_framepack_python_overrides_the_search(app, tmp_path):
    other = app.add_stub("python.exe", tmp_path / "My Python")
    code, out = app.run("run.bat", env={"FRAMEPACK_PYTHON": windows_path(other)})
    assert code == 0, out
    assert app.calls()[0]["exe"] == windows_path(other)


def test_update_bat_runs_the_update_and_waits(app):
    code, out = app.run("update.bat")
    assert code == 0, out
    (call,) = app.calls()
    assert call["argv"][1:] == [app.win("diffusers_helper\\launcher.py"), "update"]
    assert env_of(call)["PATH"].split(";")[2] == app.win("system\\git\\cmd")
    assert "FramePack is up to date. Start it with run.bat." in out and "Press any key to continue" in out


def test_update_bat_failure_says_so(app):
    code, out = app.run("update.bat", env={"STUB_EXIT": "10", "STUB_SAY": "ERROR: git fetch failed: could not resolve host"})
    assert code == 1
    assert "ERROR: git fetch failed" in out and "The update did not finish because of the error above." in out
    assert f'The log files are in "{app.win("logs")}"' in out and "up to date" not in out


def test_no_pause_for_automation(app):
    code, out = app.run("run.bat", env={"STUB_EXIT": "7", "FRAMEPACK_NO_PAUSE": "1"})
    assert code == 1 and "FramePack stopped because of the error above." in out and "Press any key" not in out
