"""Installs FramePack into a virtual environment beside the app and starts it; run by run.bat and update.bat.

Everything here runs before PyTorch (or anything else outside the standard library) is installed,
so this module imports only the standard library, and it can be run by its path
(``python diffusers_helper/launcher.py run``) as well as with ``python -m diffusers_helper.launcher``.

Commands:

    run [app flags]   install what is missing, then start demo_gradio.py (the flags are passed on)
    setup             install what is missing (``--dry-run`` prints the commands, ``--reinstall`` redoes them)
    check             report the Python, the GPUs, the PyTorch build that fits them, disk space
    update            update the code with git, then the Python packages
    test [args]       install, add pytest, run the tests

Each failure prints one line starting with ``ERROR:`` and exits with its own status (``EXIT_*`` below).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Run by path, as the .bat files do: this folder must not be on sys.path, or the package's
    # own modules (sampling.py, video.py, ...) could shadow modules of the standard library.
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if _os.path.abspath(p or _os.curdir) != _here]

import argparse
import codecs
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

# Exit statuses, one per kind of failure, so a script (or a person reading a report) can tell them apart.
EXIT_OK = 0
EXIT_USAGE = 2  # a wrong command line, as everywhere in this project
EXIT_PYTHON = 3  # this Python cannot be used (version, no venv, no pip)
EXIT_NOT_WRITABLE = 4  # the app folder cannot be written to
EXIT_DISK = 5  # not enough free disk space
EXIT_DRIVER = 6  # the NVIDIA driver is too old for the GPU
EXIT_INSTALL = 7  # pip failed
EXIT_TORCH = 8  # PyTorch is installed but cannot use the GPU
EXIT_APP = 9  # the app is missing or stopped with an error
EXIT_UPDATE = 10  # the code could not be updated

SUPPORTED_PYTHON = ((3, 10), (3, 13))  # inclusive; the range PyTorch and the requirements are known to cover

# Disk space, in GB (10**9 bytes, as drive sizes are quoted).
# The models: HunyuanVideo's text encoders and VAE (~16 GB), the FramePack transformer (~26 GB), SigLIP (~1 GB).
MODELS_GB = 43.0
INSTALL_GB = {"cuda": 9.0, "cpu": 2.5}  # PyTorch with its CUDA libraries, the requirements, pip's cache
LONG_PATH_WARNING_CHARS = 80  # model files sit about 150 characters below HF_HOME; Windows stops at 260

TORCH_INDEX = "https://download.pytorch.org/whl"
# Where update.bat fetches the code when the folder came from a ZIP rather than ``git clone``.
# Empty until the project has its public home; FRAMEPACK_REPO_URL overrides it.
REPO_URL = ""
MARKER_NAME = "framepack-setup.json"
LOGS_KEPT = {"pip": 3}  # pip's own logs are verbose (megabytes); other commands keep LOGS_KEPT_DEFAULT
LOGS_KEPT_DEFAULT = 20
PYTEST_REQUIREMENT = "pytest>=8,<10"


class LauncherError(Exception):
    """A failure the user can act on: a one-line message and the exit status that names its kind."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


# --------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as nvidia-smi reports it; fields it could not report are None."""

    name: str
    compute_capability: tuple[int, int] | None = None
    driver_version: str | None = None
    memory_mib: int | None = None
    compute_capability_guessed: bool = False  # taken from the name (drivers before R510 cannot report it)

    @property
    def has_bf16(self) -> bool | None:
        """Whether the GPU computes in bfloat16 natively (Ampere, compute capability 8.0, and newer)."""
        return None if self.compute_capability is None else self.compute_capability >= (8, 0)

    @property
    def sm(self) -> str:
        """The architecture as PyTorch names it, e.g. ``sm_120``."""
        if self.compute_capability is None:
            return "sm_?"
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    def describe(self) -> str:
        """A one-line description for the console and the log."""
        parts = [self.name]
        if self.memory_mib:
            parts.append(f"{self.memory_mib / 1024:.0f} GB")
        if self.compute_capability:
            cc = "%d.%d" % self.compute_capability
            parts.append(f"compute capability {cc}" + (" (from its name)" if self.compute_capability_guessed else ""))
        if self.driver_version:
            parts.append(f"driver {self.driver_version}")
        return ", ".join(parts)


NVIDIA_SMI_FIELDS = "name,compute_cap,driver_version,memory.total"
NVIDIA_SMI_FIELDS_OLD = "name,driver_version,memory.total"  # drivers before R510 reject compute_cap

# For drivers too old to report compute capability (before R510). Checked in order, first match
# wins, so the specific names come first: a "Quadro RTX 5000" is Turing, an "RTX 5000 Ada" is Ada.
_CC_BY_NAME: tuple[tuple[str, tuple[int, int]], ...] = (
    (r"\bg?b[12]00\b", (10, 0)),
    (r"blackwell", (12, 0)),
    (r"rtx \d+ ada|rtx 40\d0|\bl4\b|\bl40", (8, 9)),
    (r"quadro rtx|titan rtx|rtx 20\d0|gtx 16\d0|\bt4\b|\bt[1-6]00\b|\bt1000\b", (7, 5)),
    (r"rtx 50\d0", (12, 0)),
    (r"\bg?h[12]00\b|\bh800\b", (9, 0)),
    (r"rtx 30\d0|rtx a\d+|\ba(10|16|40|2)\b", (8, 6)),
    (r"\ba(100|30|800)\b", (8, 0)),
    (r"titan v\b|\bv100\b", (7, 0)),
    (r"gtx 10\d0|titan xp|titan x \(pascal\)|\bp(100|40|4|6)\b|quadro p\d+|\bmx[123]\d0\b", (6, 1)),
    (r"gtx (9\d0|750|titan x)|quadro m\d+|\bm(40|60|10)\b", (5, 2)),
    (r"gtx [67]\d0|\bk(80|40|20)\b|quadro k\d+", (3, 5)),
)


def compute_capability_from_name(name: str) -> tuple[int, int] | None:
    """The compute capability of a GPU known by name, for drivers that cannot report it; None if unknown."""
    lowered = " ".join(name.lower().split())
    for pattern, cc in _CC_BY_NAME:
        if re.search(pattern, lowered):
            return cc
    return None


def _na(value: str) -> str | None:
    value = value.strip()
    return None if not value or value.strip("[]").lower() in ("n/a", "not supported", "unknown error") else value


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """The GPUs in ``nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader``.

    Also reads the same query without ``compute_cap`` (drivers before R510; the compute capability
    is then guessed from the name), with or without ``nounits``. Other lines (warnings) are skipped.
    """
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3:
            continue
        # Read from the right: a name might contain a comma, the numbers cannot.
        driver, memory = _na(fields[-2]), _parse_memory_mib(fields[-1])
        if not _looks_like_driver(driver):
            continue
        cc_field = fields[-3] if len(fields) >= 4 else ""
        has_cc_field = _parse_compute_capability(cc_field) is not None or (cc_field and _na(cc_field) is None)
        name = ",".join(fields[:-3] if has_cc_field else fields[:-2]).strip()
        if not name:
            continue
        cc = _parse_compute_capability(cc_field) if has_cc_field else None
        guessed = cc is None and compute_capability_from_name(name) is not None
        gpus.append(Gpu(name, cc or compute_capability_from_name(name), driver, memory, guessed))
    return gpus


def _parse_compute_capability(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def _parse_memory_mib(text: str) -> int | None:
    match = re.fullmatch(r"(\d+)\s*(MiB)?", text.strip())
    return int(match.group(1)) if match else None


def _looks_like_driver(version: str | None) -> bool:
    return version is None or re.fullmatch(r"\d+(\.\d+)+", version) is not None


def driver_tuple(version: str | None) -> tuple[int, ...] | None:
    """``"570.65"`` → ``(570, 65)``, for comparing driver versions; None if there is none."""
    if not version or not re.fullmatch(r"\d+(\.\d+)*", version):
        return None
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True)
class GpuProbe:
    """What nvidia-smi said: the GPUs, and a problem worth showing when it could not list them."""

    gpus: tuple[Gpu, ...]
    problem: str | None = None


def nvidia_smi_program(environ: Mapping[str, str] | None = None) -> str | None:
    """Where nvidia-smi is: on PATH, or where older Windows drivers put it."""
    environ = os.environ if environ is None else environ
    found = shutil.which("nvidia-smi")
    if found:
        return found
    if os.name == "nt":
        for base in (environ.get("SystemRoot", r"C:\Windows") + r"\System32", environ.get("ProgramFiles", r"C:\Program Files") + r"\NVIDIA Corporation\NVSMI"):
            candidate = os.path.join(base, "nvidia-smi.exe")
            if os.path.isfile(candidate):
                return candidate
    return None


def detect_gpus(runner: "Runner", program: str | None = None) -> GpuProbe:
    """Ask nvidia-smi for the GPUs; no nvidia-smi or no driver means no GPUs, with the reason."""
    program = program or nvidia_smi_program()
    if program is None:
        return GpuProbe((), "nvidia-smi was not found, so there is no NVIDIA driver on this computer")
    result = None
    for fields in (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS_OLD):
        try:
            result = runner.capture([program, f"--query-gpu={fields}", "--format=csv,noheader"], timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            return GpuProbe((), f"nvidia-smi could not be run: {error}")
        if result.returncode == 0 or "compute_cap" not in result.output:
            break
    assert result is not None
    gpus = parse_nvidia_smi(result.output) if result.returncode == 0 else []
    if gpus:
        return GpuProbe(tuple(gpus))
    first_line = next((line.strip() for line in result.output.splitlines() if line.strip()), "no output")
    return GpuProbe((), f"nvidia-smi found no usable GPU: {first_line}")


# --------------------------------------------------------------------------------------------
# Choosing PyTorch


@dataclass(frozen=True)
class CudaBuild:
    """One CUDA flavour of the official PyTorch wheels and what it needs from the machine."""

    tag: str
    cuda: str
    min_cc: tuple[int, int]
    max_cc: tuple[int, int]
    min_driver: Mapping[str, tuple[int, ...]]  # by platform: "win32", "linux"
    requirement: str

    def supports(self, cc: tuple[int, int]) -> bool:
        return self.min_cc <= cc <= self.max_cc


# Preferred first. cu128 is the first with Blackwell kernels (RTX 50-series, sm_120) and dropped
# Maxwell/Pascal; cu126 keeps them. The driver minimums are CUDA's own (CUDA 12.x runs on any
# R525+ driver through minor-version compatibility; 12.8 features, and Blackwell, need R570).
CUDA_BUILDS = (
    CudaBuild("cu128", "12.8", (7, 0), (12, 9), {"win32": (570, 65), "linux": (570, 26)}, "torch>=2.7"),
    CudaBuild("cu126", "12.6", (5, 0), (9, 0), {"win32": (527, 41), "linux": (525, 60, 13)}, "torch>=2.7"),
)
CPU_REQUIREMENT = "torch>=2.7"
MIN_VRAM_MIB = 6 * 1024


@dataclass(frozen=True)
class TorchBuild:
    """The PyTorch to install: where from, why, what to warn about, or why it cannot be installed."""

    tag: str  # "cu128", "cu126", "cpu", or "pypi"
    index_url: str | None  # None: the default index (PyPI)
    requirement: str
    reason: str
    cuda: str | None = None
    warnings: tuple[str, ...] = ()
    error: str | None = None  # set when nothing should be installed until the user acts

    @property
    def is_cuda(self) -> bool:
        return self.cuda is not None


def _platform_key(platform: str) -> str:
    return "win32" if platform.startswith("win") else "linux"


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def choose_torch_build(gpus: Sequence[Gpu], platform: str | None = None) -> TorchBuild:
    """The PyTorch build for these GPUs: a CUDA build with kernels for every usable card, else CPU."""
    platform = sys.platform if platform is None else platform
    if platform == "darwin":
        return TorchBuild("pypi", None, CPU_REQUIREMENT, "macOS: PyTorch from PyPI (no CUDA on Macs; FramePack will be very slow)")
    key = _platform_key(platform)
    warnings: list[str] = []
    if not gpus:
        return TorchBuild(
            "cpu", f"{TORCH_INDEX}/cpu", CPU_REQUIREMENT,
            "No NVIDIA GPU was found, so PyTorch for the CPU is installed: FramePack needs an NVIDIA GPU "
            "with 6 GB of memory or more, and on the CPU a video takes many hours",
        )
    usable = []
    for gpu in gpus:
        if gpu.compute_capability is not None and gpu.compute_capability < (5, 0):
            warnings.append(f"{gpu.name} is too old for current PyTorch (compute capability {'%d.%d' % gpu.compute_capability}; 5.0 or newer is needed) and will not be used")
        else:
            usable.append(gpu)
    if not usable:
        return TorchBuild("cpu", f"{TORCH_INDEX}/cpu", CPU_REQUIREMENT, "No NVIDIA GPU here is supported by current PyTorch, so PyTorch for the CPU is installed", warnings=tuple(warnings))

    # The card the app will use: the one with the most memory (a 5090 beside a 3060 decides).
    main = max(usable, key=lambda g: (g.memory_mib or 0, g.compute_capability or (0, 0)))
    others = [g for g in usable if g is not main and g.compute_capability is not None]
    driver = driver_tuple(main.driver_version)
    cc = main.compute_capability

    def driver_ok(build: CudaBuild) -> bool:
        return driver is None or driver >= build.min_driver[key]

    # The builds with kernels for the main card (all of them when its compute capability is unknown),
    # preferring those that also have kernels for the other cards, then those the driver can run.
    fitting = [b for b in CUDA_BUILDS if cc is None or b.supports(cc)]
    if not fitting:
        return TorchBuild("cpu", f"{TORCH_INDEX}/cpu", CPU_REQUIREMENT, f"No PyTorch CUDA build supports {main.name}, so PyTorch for the CPU is installed", warnings=tuple(warnings))
    covering = [b for b in fitting if all(b.supports(g.compute_capability) for g in others)] or fitting  # type: ignore[arg-type]
    working = [b for b in covering if driver_ok(b)]
    if not working:
        build = covering[-1]  # the one asking least of the driver
        return TorchBuild(
            build.tag, f"{TORCH_INDEX}/{build.tag}", build.requirement, f"{main.name} needs PyTorch built for CUDA {build.cuda} or newer",
            cuda=build.cuda, warnings=tuple(warnings),
            error=(
                f"The NVIDIA driver {main.driver_version} is too old for {main.name}: PyTorch for CUDA {build.cuda} needs driver "
                f"{_version_text(build.min_driver[key])} or newer. Install the latest driver from https://www.nvidia.com/Download/index.aspx "
                f"(or with the NVIDIA App), restart the computer, and start FramePack again."
            ),
        )
    build = working[0]
    for gpu in others:
        if not build.supports(gpu.compute_capability):  # type: ignore[arg-type]
            warnings.append(f"{gpu.name} is not supported by PyTorch for CUDA {build.cuda} and will not be usable; FramePack uses {main.name}")
    if main.has_bf16 is False:
        warnings.append(
            f"{main.name} has no bfloat16 support in hardware (compute capability {_version_text(cc)}; the RTX 30-series and newer "  # type: ignore[arg-type]
            "have it); FramePack computes in bfloat16, so it will be much slower than on newer cards"
        )
    if main.memory_mib is not None and main.memory_mib < MIN_VRAM_MIB:
        warnings.append(f"{main.name} has {main.memory_mib / 1024:.1f} GB of memory; FramePack needs at least 6 GB")
    if cc is None:
        reason = f"{main.name} (compute capability unknown) with driver {main.driver_version or 'unknown'}: PyTorch for CUDA {build.cuda}"
    elif cc >= (10, 0):
        reason = f"{main.name} is a Blackwell card ({main.sm}), which needs PyTorch for CUDA 12.8 or newer: {build.tag}"
    else:
        reason = f"{main.name} ({main.sm}) with driver {main.driver_version or 'unknown'}: PyTorch for CUDA {build.cuda}"
    return TorchBuild(build.tag, f"{TORCH_INDEX}/{build.tag}", build.requirement, reason, cuda=build.cuda, warnings=tuple(warnings))


def with_index_override(build: TorchBuild, environ: Mapping[str, str]) -> TorchBuild:
    """Apply ``FRAMEPACK_TORCH_INDEX_URL`` (a mirror, or another CUDA flavour) to the chosen build."""
    url = environ.get("FRAMEPACK_TORCH_INDEX_URL", "").strip()
    if not url:
        return build
    return dataclasses.replace(build, index_url=url, reason=f"{build.reason} (index set by FRAMEPACK_TORCH_INDEX_URL)")


# --------------------------------------------------------------------------------------------
# Places, environment, install plan


@dataclass(frozen=True)
class Paths:
    """Where everything lives; all of it inside the app folder unless the user points elsewhere."""

    app: Path
    venv: Path
    logs: Path
    hf_home: Path
    requirements: Path
    app_script: Path
    windows: bool

    @property
    def venv_python(self) -> Path:
        """The Python of the virtual environment: the one that runs the app."""
        return self.venv / ("Scripts/python.exe" if self.windows else "bin/python")

    @property
    def marker(self) -> Path:
        return self.venv / MARKER_NAME


def app_dir() -> Path:
    """The folder holding demo_gradio.py: the parent of this package."""
    return Path(__file__).resolve().parent.parent


def make_paths(app: Path, environ: Mapping[str, str], windows: bool | None = None) -> Paths:
    """The paths for an app folder; ``FRAMEPACK_VENV`` and ``HF_HOME`` may move the environment and the models."""
    windows = (os.name == "nt") if windows is None else windows
    venv = Path(environ["FRAMEPACK_VENV"]) if environ.get("FRAMEPACK_VENV") else app / ".venv"
    hf_home = Path(environ["HF_HOME"]) if environ.get("HF_HOME") else app / "hf_download"
    return Paths(app, venv, app / "logs", hf_home, app / "requirements.txt", app / "demo_gradio.py", windows)


def app_environment(app: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment pip and the app run in: environment.bat's choices, so Linux gets them too.

    Values already set (by environment.bat, user.bat or the user) are kept.
    """
    env = dict(environ)
    defaults = {
        "HF_HOME": app / "hf_download",
        "PIP_CACHE_DIR": app / "cache" / "pip",
        "TORCH_HOME": app / "cache" / "torch",
        "GRADIO_TEMP_DIR": app / "temp" / "gradio",
    }
    for name, value in defaults.items():
        if not env.get(name):
            env[name] = str(value)
    env.update(PYTHONUTF8="1", PYTHONIOENCODING="utf-8", PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONHOME", None)  # a stray one breaks the virtual environment's Python
    return env


@dataclass(frozen=True)
class InstallPlan:
    """What setup must do; each field is one step."""

    create_venv: bool = False
    install_torch: bool = False
    replace_torch: bool = False  # uninstall first: pip keeps an installed torch of another build
    install_requirements: bool = False
    notes: tuple[str, ...] = ()

    @property
    def nothing(self) -> bool:
        return not (self.create_venv or self.install_torch or self.install_requirements)


def plan_install(marker: Mapping | None, build: TorchBuild, requirements_sha256: str, venv_exists: bool, reinstall: bool = False) -> InstallPlan:
    """Compare what is installed (the marker setup wrote last time) with what is wanted now."""
    if not venv_exists:
        return InstallPlan(create_venv=True, install_torch=True, install_requirements=True)
    if reinstall or not marker:
        # Unknown state (an install cut short, or a venv made by hand): a torch in it may be any build.
        return InstallPlan(install_torch=True, replace_torch=True, install_requirements=True)
    notes = []
    install_torch = replace_torch = False
    installed = marker.get("torch_build")
    if installed != build.tag:
        if build.tag == "cpu" and installed not in (None, "cpu", "pypi"):
            # Most likely a driver that is updating or broken right now; don't throw away a working CUDA build.
            notes.append(f"No NVIDIA GPU was found now, but PyTorch for {installed} is installed; keeping it")
        else:
            install_torch = replace_torch = True
            notes.append(f"PyTorch for {installed} is installed; this computer needs {build.tag}")
    requirements_changed = marker.get("requirements_sha256") != requirements_sha256
    if requirements_changed:
        notes.append("requirements.txt changed since the last install")
    return InstallPlan(False, install_torch, replace_torch, requirements_changed or install_torch, tuple(notes))


def install_commands(
    python: str | os.PathLike,
    build: TorchBuild,
    requirements: str | os.PathLike,
    plan: InstallPlan | None = None,
    log_file: str | os.PathLike | None = None,
) -> list[list[str]]:
    """The pip commands that install PyTorch (from its own index) and then the requirements."""
    plan = plan or InstallPlan(install_torch=True, install_requirements=True)
    pip = [str(python), "-m", "pip"]
    extra = ["--log", str(log_file)] if log_file else []
    commands = []
    if plan.replace_torch:
        commands.append(pip + ["uninstall", "--yes", "torch"])
    if plan.install_torch:
        torch = pip + ["install", *extra, build.requirement]
        if build.index_url:
            # --index-url, not --extra-index-url: on Windows, PyPI's torch is the CPU build, and pip
            # would take it whenever its version is higher.
            torch += ["--index-url", build.index_url]
        commands.append(torch)
    if plan.install_requirements:
        commands.append(pip + ["install", *extra, "-r", str(requirements)])
    return commands


def venv_command(base_python: str | os.PathLike, venv: str | os.PathLike, with_pip: bool = True) -> list[str]:
    """The command that creates the virtual environment."""
    return [str(base_python), "-m", "venv", *([] if with_pip else ["--without-pip"]), str(venv)]


# --------------------------------------------------------------------------------------------
# Checks


def check_python_version(version: Sequence[int] | None = None) -> None:
    """Stop unless this Python is one FramePack supports."""
    version = tuple(sys.version_info[:3] if version is None else version)
    low, high = SUPPORTED_PYTHON
    if low <= tuple(version[:2]) <= high:
        return
    shown = ".".join(str(v) for v in version[:3])
    raise LauncherError(
        EXIT_PYTHON,
        f"Python {shown} is not supported: FramePack needs Python {low[0]}.{low[1]} to {high[0]}.{high[1]}. "
        f"Install Python 3.12 from https://www.python.org/downloads/ and start FramePack again.",
    )


def free_gb(path: str | os.PathLike) -> float:
    """Free space on the drive holding ``path`` (or its nearest existing parent), in GB."""
    probe = Path(path).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free / 1e9


def check_disk_space(path: str | os.PathLike, needed_gb: float, what: str = "this", free: Callable[[str | os.PathLike], float] = free_gb) -> float:
    """Stop with a message unless ``needed_gb`` is free where ``path`` is; returns the free GB."""
    available = free(path)
    if available < needed_gb:
        raise LauncherError(
            EXIT_DISK,
            f"Not enough disk space for {what}: {needed_gb:.0f} GB are needed in {path}, but only {available:.1f} GB are free "
            f"on that drive. Free some space, or move the FramePack folder (or only the models, see HF_HOME in the README) "
            f"to a drive with more room, then start FramePack again.",
        )
    return available


def folder_size_gb(path: str | os.PathLike) -> float:
    """The size of the files under ``path`` in GB (0 if it does not exist); links are not followed."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total / 1e9


def models_needed_gb(app_args: Sequence[str], hf_home: str | os.PathLike, size: Callable[[str | os.PathLike], float] = folder_size_gb) -> float:
    """What is left to download for the models, in GB: none with ``--tiny`` or when every model is a local folder."""
    if "--tiny" in app_args:
        return 0.0
    def local(*flags: str) -> bool:
        return any((value := _flag_value(app_args, flag)) and Path(value).is_dir() for flag in flags)

    if local("--hunyuan") and local("--siglip") and local("--transformer", "--framepack-transformer", "--f1-transformer"):
        return 0.0
    # Whatever is in the cache already counts as downloaded: generous, but never blocks a user needlessly.
    return max(0.0, MODELS_GB - size(Path(hf_home) / "hub"))


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last ``--flag VALUE`` or ``--flag=VALUE`` in ``args``."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def check_writable(folder: str | os.PathLike) -> None:
    """Stop unless files can be created in ``folder`` (it is created if missing)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise LauncherError(
            EXIT_NOT_WRITABLE,
            f"FramePack cannot write to {folder} ({error.strerror or error}). Move the FramePack folder to a place you own, "
            f"such as C:\\FramePack or your Documents folder (not Program Files), and start it again; "
            f"it never needs administrator rights.",
        ) from error


def path_warnings(app: Path, windows: bool, long_paths_enabled: bool | None = None) -> list[str]:
    """Things about where the app lives that cause trouble later, as warnings."""
    warnings = []
    if not windows:
        return warnings
    if long_paths_enabled is None:
        long_paths_enabled = _windows_long_paths_enabled()
    if len(str(app)) > LONG_PATH_WARNING_CHARS and not long_paths_enabled:
        warnings.append(
            f"The folder path is {len(str(app))} characters long; model files lie about 150 characters deeper and Windows "
            f"stops at 260. If downloads fail, move FramePack to a short path such as C:\\FramePack."
        )
    if any(part.lower().startswith("onedrive") for part in app.parts):
        warnings.append("FramePack is inside OneDrive, which would upload the 40 GB of models; a folder such as C:\\FramePack is better.")
    return warnings


def _windows_long_paths_enabled() -> bool:
    try:
        import winreg  # type: ignore[import-not-found]

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return bool(winreg.QueryValueEx(key, "LongPathsEnabled")[0])
    except (ImportError, OSError):
        return False


# What the environment's Python reports about its PyTorch; it runs after the install, inside the venv.
TORCH_PROBE = r"""
import json
info = {}
try:
    import torch
    info["version"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["available"] = bool(torch.cuda.is_available())
    if info["available"]:
        info["arch_list"] = torch.cuda.get_arch_list()
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        try:
            info["kernel"] = float((torch.ones(4, device="cuda") * 2).sum().item())
        except Exception as error:
            info["kernel_error"] = str(error).splitlines()[0]
except Exception as error:
    info["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
print("TORCH_PROBE " + json.dumps(info))
"""


def judge_torch(info: Mapping, build: TorchBuild) -> str | None:
    """What is wrong with the installed PyTorch, as one line, or None when it works with the GPU."""
    if "error" in info:
        return f"PyTorch was installed but cannot be imported ({info['error']}). Delete the .venv folder and start FramePack again."
    if not build.is_cuda:
        return None
    if not info.get("cuda"):
        return (
            f"A PyTorch without CUDA ({info.get('version')}) is installed, so the GPU cannot be used. "
            f"Delete the .venv folder and start FramePack again; the right build ({build.tag}) will be installed."
        )
    if not info.get("available"):
        return (
            f"PyTorch {info.get('version')} cannot use the GPU (torch.cuda.is_available() is False). Update the NVIDIA driver "
            f"from https://www.nvidia.com/Download/index.aspx, restart the computer, and start FramePack again."
        )
    kernel_error = info.get("kernel_error")
    if kernel_error:
        capability = info.get("capability") or []
        sm = "sm_" + "".join(str(c) for c in capability) if capability else "this GPU"
        if "no kernel image" in kernel_error:
            return (
                f"PyTorch {info.get('version')} has no kernels for {info.get('device', 'this GPU')} ({sm}; it has "
                f"{', '.join(info.get('arch_list') or []) or 'none'}): \"no kernel image is available\". Delete the .venv folder and "
                f"start FramePack again to install the right build; if this stays, report it with the log."
            )
        return f"PyTorch cannot run on the GPU: {kernel_error}. Update the NVIDIA driver and restart the computer."
    return None


def installed_torch_fits(info: Mapping, build: TorchBuild) -> bool:
    """Whether a PyTorch found in the environment (TORCH_PROBE's report) is the build that was chosen."""
    if "error" in info or not info.get("version"):
        return False
    return (info.get("cuda") or None) == build.cuda


def parse_torch_probe(output: str) -> dict | None:
    """The JSON line TORCH_PROBE printed, if any."""
    for line in output.splitlines():
        if line.startswith("TORCH_PROBE "):
            try:
                return json.loads(line[len("TORCH_PROBE "):])
            except ValueError:
                return None
    return None


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, to notice when requirements.txt changes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def write_marker(path: Path, data: Mapping) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(dict(data), indent=2), encoding="utf-8")
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------
# Running programs and logging


def format_command(command: Sequence[str]) -> str:
    """A command as the user would type it."""
    return subprocess.list2cmdline(command) if os.name == "nt" else shlex.join(command)


@dataclass
class Completed:
    returncode: int
    output: str


class Runner:
    """Runs the programs the launcher needs; tests swap in a fake that records the commands."""

    def capture(self, command: Sequence[str], *, cwd=None, env=None, timeout: float | None = None) -> Completed:
        """Run and collect stdout and stderr together."""
        done = subprocess.run(
            list(command), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=timeout, encoding="utf-8", errors="replace",
        )
        return Completed(done.returncode, done.stdout or "")

    def inherit(self, command: Sequence[str], *, cwd=None, env=None) -> int:
        """Run on the user's console (pip draws its progress bars there)."""
        return subprocess.call(list(command), cwd=cwd, env=env)

    def tee(self, command: Sequence[str], log: "Log", *, cwd=None, env=None) -> int:
        """Run with the output going to the console and to the log."""
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                chunk = process.stdout.read1(65536) if hasattr(process.stdout, "read1") else process.stdout.read(4096)
                if not chunk:
                    break
                log.echo_output(decoder.decode(chunk))
            log.echo_output(decoder.decode(b"", final=True))
            return process.wait()
        except KeyboardInterrupt:
            # Ctrl+C reached the app too (same console); give it a moment to stop on its own.
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise


class Log:
    """The launcher's messages, on the console and appended to the log file.

    The file is opened for each write, so pip (``--log``) and the update's second launcher can
    append to logs of their own at the same time without Windows refusing a shared file.
    """

    def __init__(self, path: Path | None = None, stream=None):
        self.path = None
        self._stream = stream
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
                self.path = path
            except OSError:
                pass  # an unwritable folder is reported by check_writable; the console still works

    def say(self, text: str = "") -> None:
        """A line for the user and the log."""
        self.echo_output(text + "\n")

    def note(self, text: str) -> None:
        """Text for the log only (the output of commands the user need not see)."""
        self._append(text if text.endswith("\n") else text + "\n")

    def echo_output(self, text: str) -> None:
        """Text for the console and the log."""
        if not text:
            return
        stream = self._stream if self._stream is not None else sys.stdout
        try:
            stream.write(text)
            stream.flush()
        except UnicodeEncodeError:
            encoding = getattr(stream, "encoding", None) or "ascii"
            stream.write(text.encode(encoding, "replace").decode(encoding))
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass  # no console (the window was closed): the log still gets it
        self._append(text)

    def _append(self, text: str) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a", encoding="utf-8", errors="replace") as file:
                file.write(text)
        except OSError:
            pass


def new_log_path(logs: Path, command: str, now: _dt.datetime | None = None) -> Path:
    """``logs/<command>-YYYYmmdd-HHMMSS.log``."""
    now = now or _dt.datetime.now()
    return logs / f"{command}-{now:%Y%m%d-%H%M%S}.log"


def prune_logs(logs: Path, keep: Mapping[str, int] | int | None = None) -> None:
    """Delete all but the newest logs of each command (``keep`` of them, or LOGS_KEPT's number)."""
    try:
        files = sorted(logs.glob("*-????????-??????.log"), reverse=True)
    except OSError:
        return
    seen: dict[str, int] = {}
    for path in files:
        command = path.name.rsplit("-", 2)[0]
        seen[command] = seen.get(command, 0) + 1
        limit = keep if isinstance(keep, int) else (LOGS_KEPT if keep is None else keep).get(command, LOGS_KEPT_DEFAULT)
        if seen[command] > limit:
            try:
                path.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# The steps


@dataclass
class Context:
    """Everything the commands share."""

    paths: Paths
    env: dict[str, str]
    log: Log
    runner: Runner = field(default_factory=Runner)
    nvidia_smi: str | None = None  # found on PATH when None
    free_space: Callable[[str | os.PathLike], float] = free_gb
    platform: str = sys.platform
    base_python: str = sys.executable
    dry_run: bool = False

    def run_pip(self, command: list[str], failure: str) -> None:
        """Run pip on the console, where it draws its progress bars; its own detailed log is named in ``--log``."""
        self.log.say("> " + format_command(command))
        if self.dry_run:
            return
        code = self.runner.inherit(command, cwd=str(self.paths.app), env=self.env)
        self.log.note(f"pip exited with status {code}")
        if code != 0:
            detail = f" pip's detailed log is {command[command.index('--log') + 1]}." if "--log" in command else ""
            raise LauncherError(
                EXIT_INSTALL,
                f"{failure} (pip exited with status {code}). Check the internet connection and the messages above, then start FramePack again.{detail}",
            )


def check_venv(ctx: Context) -> bool:
    """Whether a working virtual environment exists; one that no longer starts is repaired or removed."""
    paths = ctx.paths
    if not paths.venv_python.exists():
        return False
    if _venv_works(ctx):
        return True
    ctx.log.say(f"The Python environment in {paths.venv} does not start (was the folder moved?); making it again.")
    if not ctx.dry_run:
        shutil.rmtree(paths.venv, ignore_errors=True)
    return False


def create_venv(ctx: Context) -> None:
    """Create the virtual environment with pip in it."""
    paths = ctx.paths
    ctx.log.say(f"Creating the Python environment in {paths.venv}")
    command = venv_command(ctx.base_python, paths.venv)
    ctx.log.say("> " + format_command(command))
    if ctx.dry_run:
        return
    done = ctx.runner.capture(command, cwd=str(paths.app), env=ctx.env, timeout=600)
    ctx.log.note(done.output)
    if done.returncode == 0 and paths.venv_python.exists():
        return
    output = done.output
    if "No module named venv" in output or "No module named 'venv'" in output:
        raise LauncherError(
            EXIT_PYTHON,
            f"This Python ({ctx.base_python}) cannot create virtual environments (it has no 'venv' module, as the 'embeddable' "
            f"Python is). Install Python 3.12 from https://www.python.org/downloads/ and start FramePack again.",
        )
    if "ensurepip" in output:
        # Debian and Ubuntu split pip's installer off (python3-venv); fetch pip from PyPI instead.
        shutil.rmtree(paths.venv, ignore_errors=True)
        ctx.log.say("This Python has no ensurepip; creating the environment without pip and fetching pip from PyPI.")
        done = ctx.runner.capture(venv_command(ctx.base_python, paths.venv, with_pip=False), cwd=str(paths.app), env=ctx.env, timeout=600)
        ctx.log.note(done.output)
        if done.returncode == 0 and paths.venv_python.exists() and bootstrap_pip(ctx):
            return
        raise LauncherError(
            EXIT_PYTHON,
            "Python could not create a virtual environment with pip. On Debian or Ubuntu run: sudo apt install python3-venv "
            "(or python3.X-venv for your version), then start FramePack again.",
        )
    last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
    raise LauncherError(EXIT_PYTHON, f"Python could not create a virtual environment in {paths.venv}: {last}")


def _venv_works(ctx: Context) -> bool:
    python = ctx.paths.venv_python
    if not python.exists():
        return False
    if ctx.dry_run:
        return True
    _repair_moved_venv(ctx.paths.venv, Path(ctx.base_python))
    try:
        return ctx.runner.capture([str(python), "-c", "import sys"], env=ctx.env, timeout=120).returncode == 0
    except OSError:
        return False


def _repair_moved_venv(venv: Path, base_python: Path) -> bool:
    """Point pyvenv.cfg at the base Python again after the app folder (with its portable Python) moved."""
    config = venv / "pyvenv.cfg"
    try:
        lines = config.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    values = {k.strip().lower(): v.strip() for k, _, v in (line.partition("=") for line in lines)}
    home = values.get("home")
    version = values.get("version") or values.get("version_info") or ""
    current = ".".join(str(v) for v in sys.version_info[:2])
    if not home or Path(home).exists() or not version.startswith(current):
        return False
    rewritten = [f"home = {base_python.parent}" if line.split("=")[0].strip().lower() == "home" else line for line in lines]
    config.write_text("\n".join(rewritten) + "\n", encoding="utf-8")
    return True


PIP_JSON_URL = "https://pypi.org/pypi/pip/json"


def pip_wheel_url(pypi_json: Mapping, base: str = PIP_JSON_URL) -> str | None:
    """The URL of the pip wheel in PyPI's JSON for the pip project (mirrors may give it relative to ``base``)."""
    for item in pypi_json.get("urls", []):
        if item.get("packagetype") == "bdist_wheel" and str(item.get("filename", "")).endswith(".whl"):
            return urllib.parse.urljoin(base, item.get("url", ""))
    return None


def bootstrap_pip(ctx: Context) -> bool:
    """Install pip into a venv made ``--without-pip``, from PyPI's wheel (pip can run from its own wheel)."""
    try:
        with urllib.request.urlopen(PIP_JSON_URL, timeout=60) as response:
            url = pip_wheel_url(json.load(response), response.geturl())
        if not url:
            return False
        with tempfile.TemporaryDirectory(dir=ctx.env.get("TEMP") or None) as folder:
            wheel = Path(folder) / url.rsplit("/", 1)[-1]
            with urllib.request.urlopen(url, timeout=300) as response, open(wheel, "wb") as out:
                shutil.copyfileobj(response, out)
            command = [str(ctx.paths.venv_python), str(wheel / "pip"), "install", "--no-index", str(wheel)]
            ctx.log.say("> " + format_command(command))
            return ctx.runner.inherit(command, cwd=str(ctx.paths.app), env=ctx.env) == 0
    except (OSError, ValueError) as error:
        ctx.log.say(f"Could not fetch pip from PyPI: {error}")
        return False


def choose_build(ctx: Context) -> TorchBuild:
    """Detect the GPUs, report them, and choose PyTorch; stops when the driver must be updated first."""
    probe = detect_gpus(ctx.runner, ctx.nvidia_smi)
    for gpu in probe.gpus:
        ctx.log.say(f"GPU: {gpu.describe()}")
    if probe.problem:
        ctx.log.say(f"GPU: none ({probe.problem})")
    build = with_index_override(choose_torch_build(probe.gpus, ctx.platform), ctx.env)
    ctx.log.say(f"PyTorch: {build.tag} ({build.reason})")
    for warning in build.warnings:
        ctx.log.say(f"WARNING: {warning}")
    if build.error:
        raise LauncherError(EXIT_DRIVER, build.error)
    return build


def setup(ctx: Context, reinstall: bool = False) -> TorchBuild:
    """Make the virtual environment hold PyTorch for this GPU and the requirements; quick when nothing changed."""
    paths = ctx.paths
    # 1. This Python, this folder
    check_python_version()
    check_writable(paths.logs)
    for warning in path_warnings(paths.app, paths.windows):
        ctx.log.say(f"WARNING: {warning}")
    if not paths.requirements.is_file():
        raise LauncherError(EXIT_APP, f"{paths.requirements} is missing: the download is incomplete. Download FramePack again.")

    # 2. The PyTorch build for this machine
    build = choose_build(ctx)

    # 3. What is missing
    marker = read_marker(paths.marker)
    requirements_sha = sha256_of(paths.requirements)
    venv_ok = check_venv(ctx)
    plan = plan_install(marker if venv_ok else None, build, requirements_sha, venv_ok, reinstall)
    if plan.install_torch and not marker and not reinstall and venv_ok and not ctx.dry_run:
        # An environment without our marker (made by hand, or an install cut short): keep a PyTorch that fits.
        info = _probe_torch(ctx)
        if installed_torch_fits(info, build):
            plan = dataclasses.replace(plan, install_torch=False, replace_torch=False, notes=(*plan.notes, f"PyTorch {info['version']} is already installed and fits"))
    for note in plan.notes:
        ctx.log.say(note)
    if plan.nothing:
        ctx.log.say("Python packages are installed.")
        return build
    if plan.install_torch or plan.create_venv:
        needed = INSTALL_GB["cuda" if build.is_cuda else "cpu"]
        check_disk_space(paths.venv, needed, "PyTorch and the other Python packages", ctx.free_space)
        size = "about 3 GB" if build.is_cuda else "about 1 GB"
        ctx.log.say(f"Installing PyTorch and the other packages: {size} to download, which takes a while the first time.")

    # 4. The environment, then pip
    if plan.create_venv:
        create_venv(ctx)
    pip_log = None if ctx.dry_run else new_log_path(paths.logs, "pip")
    for command in install_commands(paths.venv_python, build, paths.requirements, plan, pip_log):
        is_torch = any(arg.startswith("torch") for arg in command[4:]) or "uninstall" in command
        ctx.run_pip(command, "PyTorch could not be installed" if is_torch else "The packages in requirements.txt could not be installed")

    # 5. Check that PyTorch works with the GPU before remembering the install
    if not ctx.dry_run:
        verify_torch(ctx, build)
        write_marker(paths.marker, {
            "torch_build": build.tag, "index_url": build.index_url, "requirements_sha256": requirements_sha,
            "python": ".".join(str(v) for v in sys.version_info[:3]), "installed": _dt.datetime.now().isoformat(timespec="seconds"),
        })
    ctx.log.say("Python packages are installed.")
    return build


def _probe_torch(ctx: Context) -> dict:
    """TORCH_PROBE's report from the environment's Python."""
    try:
        done = ctx.runner.capture([str(ctx.paths.venv_python), "-c", TORCH_PROBE], cwd=str(ctx.paths.app), env=ctx.env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": str(error)}
    ctx.log.note(done.output)
    return parse_torch_probe(done.output) or {"error": (done.output.strip().splitlines() or ["no output"])[-1]}


def verify_torch(ctx: Context, build: TorchBuild) -> dict:
    """Import PyTorch in the environment and run one GPU kernel; stop with the reason if that fails."""
    info = _probe_torch(ctx)
    problem = judge_torch(info, build)
    if problem:
        raise LauncherError(EXIT_TORCH, problem)
    where = f"CUDA {info.get('cuda')} on {info.get('device')}" if info.get("available") else "CPU"
    ctx.log.say(f"PyTorch {info.get('version')} works ({where}).")
    return info


def start_app(ctx: Context, app_args: Sequence[str]) -> int:
    """Start demo_gradio.py in the environment, its output on the console and in the log."""
    paths = ctx.paths
    if not paths.app_script.is_file():
        raise LauncherError(EXIT_APP, f"{paths.app_script} is missing: the download is incomplete. Download FramePack again.")
    missing = models_needed_gb(app_args, paths.hf_home)
    if missing > 0 and ctx.env.get("FRAMEPACK_SKIP_DISK_CHECK") != "1":
        check_disk_space(paths.hf_home, missing, f"the models (about {MODELS_GB:.0f} GB in all)", ctx.free_space)
    command = [str(paths.venv_python), str(paths.app_script), "--server", "127.0.0.1", "--inbrowser", *app_args]
    ctx.log.say("Starting FramePack; the browser opens when it is ready.")
    if missing > 0:
        ctx.log.say(f"The first video downloads the models (up to {missing:.0f} GB) into {paths.hf_home}; that takes a while.")
    ctx.log.say("> " + format_command(command))
    if ctx.dry_run:
        return 0
    try:
        code = ctx.runner.tee(command, ctx.log, cwd=str(paths.app), env=ctx.env)
    except OSError as error:
        raise LauncherError(EXIT_APP, f"FramePack could not be started: {error}") from error
    if code != 0:
        raise LauncherError(EXIT_APP, f"FramePack stopped with an error (status {code}); the messages above say why.")
    return 0


# --------------------------------------------------------------------------------------------
# Updating the code


@dataclass(frozen=True)
class UpdateResult:
    """What ``update_code`` did, for the user."""

    changed: bool
    messages: tuple[str, ...]
    stash: str | None = None
    backup_branch: str | None = None


def _git(runner: Runner, app: Path, env: Mapping[str, str], *args: str, check: bool = True, timeout: float = 300) -> Completed:
    # safe.directory: a folder unpacked by another account, or on a USB drive, is otherwise refused as "dubious ownership".
    command = ["git", "-c", "safe.directory=*", "-c", "user.name=FramePack update", "-c", "user.email=update@framepack.invalid", *args]
    try:
        done = runner.capture(command, cwd=str(app), env=dict(env), timeout=timeout)
    except OSError as error:
        raise LauncherError(EXIT_UPDATE, f"git could not be run ({error}). Install Git from https://git-scm.com/downloads, or put a portable Git in the system\\git folder.") from error
    except subprocess.TimeoutExpired as error:
        raise LauncherError(EXIT_UPDATE, f"git {args[0]} took too long; check the internet connection and try again.") from error
    if check and done.returncode != 0:
        last = next((line.strip() for line in reversed(done.output.splitlines()) if line.strip()), "no output")
        raise LauncherError(EXIT_UPDATE, f"git {args[0]} failed: {last}")
    return done


def _paths_z(output: str) -> list[str]:
    return [p for p in output.split("\0") if p]


def update_code(app: Path, runner: Runner, env: Mapping[str, str], now: _dt.datetime | None = None) -> UpdateResult:
    """Bring the checkout up to date with its upstream branch, setting aside local changes that are in the way.

    Local edits to files the update does not touch stay where they are. Edits to files it changes
    are saved with ``git stash`` (and named in the messages); local commits are kept on a backup branch.
    """
    env = {**env, "GIT_TERMINAL_PROMPT": "0"}  # never wait for a password nobody will type
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    messages: list[str] = []
    if not (app / ".git").exists():
        url = env.get("FRAMEPACK_REPO_URL") or REPO_URL
        if not url:
            raise LauncherError(
                EXIT_UPDATE,
                f"{app} is not a git checkout (it was probably downloaded as a ZIP), so it cannot update itself. Download the "
                f"new version and unpack it over this folder; your models in hf_download and the .venv are kept.",
            )
        messages += _checkout_in_place(app, runner, env, url, stamp)
    _git(runner, app, env, "fetch", "--quiet", timeout=900)
    upstream = _git(runner, app, env, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}", check=False)
    if upstream.returncode != 0:
        raise LauncherError(EXIT_UPDATE, "This checkout's branch follows no remote branch, so there is nothing to update from. Run: git branch --set-upstream-to=origin/main")
    upstream_name = upstream.output.strip().splitlines()[-1]
    counts = _git(runner, app, env, "rev-list", "--left-right", "--count", "HEAD...@{upstream}").output.split()
    ahead, behind = int(counts[0]), int(counts[1])
    if behind == 0:
        return UpdateResult(bool(messages), (*messages, f"Already up to date with {upstream_name}."))
    old = _git(runner, app, env, "rev-parse", "--short", "HEAD").output.strip()
    local = set(_paths_z(_git(runner, app, env, "diff", "--name-only", "-z", "HEAD").output))
    incoming = set(_paths_z(_git(runner, app, env, "diff", "--name-only", "-z", "HEAD", "@{upstream}").output))
    untracked = set(_paths_z(_git(runner, app, env, "ls-files", "--others", "--exclude-standard", "-z").output))
    backup = None
    stash = None
    if ahead:
        backup = f"framepack-backup-{stamp}"
        _git(runner, app, env, "branch", backup, "HEAD")
        messages.append(f"This folder had {ahead} commit(s) of its own; they are kept on the branch {backup}.")
        in_the_way = sorted(local | (untracked & incoming))
    else:
        in_the_way = sorted((local & incoming) | (untracked & incoming))
    if in_the_way:
        stash = f"framepack update {stamp}"
        _git(runner, app, env, "stash", "push", "--include-untracked", "--message", stash, "--", *in_the_way)
        messages.append(
            f"Your changes to {', '.join(in_the_way)} conflicted with the update, so they were set aside with git stash "
            f"as \"{stash}\"; 'git stash list' shows them and 'git stash pop' brings them back."
        )
    if ahead:
        _git(runner, app, env, "reset", "--keep", "@{upstream}")
    else:
        _git(runner, app, env, "merge", "--ff-only", "--quiet", "@{upstream}")
    new = _git(runner, app, env, "rev-parse", "--short", "HEAD").output.strip()
    messages.insert(0 if not messages else 1, f"Updated {old} -> {new} ({behind} new commit(s) from {upstream_name}).")
    kept = sorted(local - set(in_the_way))
    if kept:
        messages.append(f"Your changes to {', '.join(kept)} did not conflict and are still in place.")
    return UpdateResult(True, tuple(messages), stash, backup)


def _checkout_in_place(app: Path, runner: Runner, env: Mapping[str, str], url: str, stamp: str) -> list[str]:
    """Make a folder unpacked from a ZIP into a git checkout of ``url``'s default branch.

    Nothing is lost: files that differ from the repository (an older version, or your edits)
    are saved with git stash before the repository's files replace them.
    """
    _git(runner, app, env, "init", "--quiet")
    _git(runner, app, env, "remote", "add", "origin", url)
    _git(runner, app, env, "fetch", "--quiet", "origin", timeout=900)
    _git(runner, app, env, "remote", "set-head", "origin", "--auto")
    branch = _git(runner, app, env, "rev-parse", "--abbrev-ref", "origin/HEAD").output.strip().split("/", 1)[-1]
    _git(runner, app, env, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
    _git(runner, app, env, "reset", "--quiet", f"origin/{branch}")  # the index only; the files stay as unpacked
    _git(runner, app, env, "branch", "--quiet", "--set-upstream-to", f"origin/{branch}")
    differing = sorted(set(_paths_z(_git(runner, app, env, "diff", "--name-only", "-z", "HEAD").output)))
    messages = [f"This folder was not a git checkout (a ZIP download); it now is one, of {url} ({branch})."]
    if differing:
        stash = f"framepack update {stamp}: files of the ZIP download"
        _git(runner, app, env, "stash", "push", "--message", stash, "--", *differing)
        messages.append(f"{len(differing)} file(s) differed from the repository; they were saved with git stash as \"{stash}\".")
    return messages


# --------------------------------------------------------------------------------------------
# Commands


def _banner(ctx: Context, command: str) -> None:
    ctx.log.say(f"FramePack launcher: {command}, {_dt.datetime.now():%Y-%m-%d %H:%M:%S}")
    ctx.log.say(f"Folder: {ctx.paths.app}")
    ctx.log.say(f"Python: {sys.version.split()[0]} ({ctx.base_python})")
    ctx.log.say(f"Models (HF_HOME): {ctx.paths.hf_home}")
    if ctx.log.path:
        ctx.log.say(f"Log: {ctx.log.path}")


def cmd_run(ctx: Context, app_args: Sequence[str]) -> int:
    setup(ctx)
    return start_app(ctx, app_args)


def cmd_setup(ctx: Context, reinstall: bool) -> int:
    setup(ctx, reinstall=reinstall)
    return EXIT_OK


def cmd_check(ctx: Context) -> int:
    """Report; the status is that of the first problem found."""
    check_python_version()
    for warning in path_warnings(ctx.paths.app, ctx.paths.windows):
        ctx.log.say(f"WARNING: {warning}")
    status = EXIT_OK
    try:
        build = choose_build(ctx)
    except LauncherError as error:
        ctx.log.say(f"ERROR: {error.message}")
        status, build = error.exit_code, None
    ctx.log.say(
        f"Disk: {ctx.free_space(ctx.paths.hf_home):.1f} GB free for the models in {ctx.paths.hf_home}; "
        f"about {models_needed_gb([], ctx.paths.hf_home):.0f} GB still to download"
    )
    if not ctx.paths.venv_python.exists():
        ctx.log.say(f"Not installed yet ({ctx.paths.venv} does not exist).")
    elif build is not None:
        try:
            verify_torch(ctx, build)
        except LauncherError as error:
            ctx.log.say(f"ERROR: {error.message}")
            status = status or error.exit_code
    return status


def cmd_update(ctx: Context) -> int:
    result = update_code(ctx.paths.app, ctx.runner, ctx.env)
    for message in result.messages:
        ctx.log.say(message)
    # The launcher itself may have changed: let the new one install what the new requirements ask for.
    command = [ctx.base_python, str(ctx.paths.app / "diffusers_helper" / "launcher.py"), "setup"]
    ctx.log.say("> " + format_command(command))
    code = ctx.runner.inherit(command, cwd=str(ctx.paths.app), env=ctx.env)
    if code != 0:
        raise LauncherError(code if 0 < code < 64 else EXIT_INSTALL, "The code was updated, but installing the packages failed; the messages above say why.")
    return EXIT_OK


def cmd_test(ctx: Context, pytest_args: Sequence[str]) -> int:
    setup(ctx)
    python = str(ctx.paths.venv_python)
    dev_requirements = ctx.paths.app / "requirements-dev.txt"
    if dev_requirements.is_file():
        ctx.run_pip([python, "-m", "pip", "install", "-r", str(dev_requirements)], "The test requirements could not be installed")
    elif ctx.dry_run or ctx.runner.capture([python, "-c", "import pytest"], env=ctx.env, timeout=120).returncode != 0:
        ctx.run_pip([python, "-m", "pip", "install", PYTEST_REQUIREMENT], "pytest could not be installed")
    command = [python, "-m", "pytest", *(pytest_args or ["-q", "tests"])]
    ctx.log.say("> " + format_command(command))
    if ctx.dry_run:
        return EXIT_OK
    return ctx.runner.inherit(command, cwd=str(ctx.paths.app), env=ctx.env)


PASS_THROUGH = ("run", "test")  # their other arguments belong to demo_gradio.py and pytest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher", description="Install and start FramePack.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="install what is missing, then start the app; other arguments go to demo_gradio.py")
    setup_parser = commands.add_parser("setup", help="install what is missing")
    setup_parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    setup_parser.add_argument("--reinstall", action="store_true", help="reinstall PyTorch and the requirements")
    commands.add_parser("check", help="report the Python, GPUs, PyTorch build and disk space")
    commands.add_parser("update", help="update the code with git, then the packages")
    commands.add_parser("test", help="install, add pytest and run the tests; other arguments go to pytest")
    return parser


def make_context(command: str, app: Path | None = None, environ: Mapping[str, str] | None = None, dry_run: bool = False, **fields) -> Context:
    """The context for one command: paths, environment, and a new log file (none for a dry run)."""
    app = app or app_dir()
    env = app_environment(app, dict(os.environ if environ is None else environ))
    paths = make_paths(app, env)
    log = fields.pop("log", None) or Log(None if dry_run else new_log_path(paths.logs, command))
    return Context(paths, env, log, dry_run=dry_run, **fields)


def execute(ctx: Context, command: str, passed_on: Sequence[str] = (), reinstall: bool = False) -> int:
    """Run one command; a failure becomes its ``ERROR:`` line, the log's path and its exit status."""
    try:
        _banner(ctx, command)
        if command == "run":
            return cmd_run(ctx, [*split_args(ctx.env.get("FRAMEPACK_ARGS", "")), *passed_on])
        if command == "setup":
            return cmd_setup(ctx, reinstall)
        if command == "check":
            return cmd_check(ctx)
        if command == "update":
            return cmd_update(ctx)
        if command == "test":
            return cmd_test(ctx, passed_on)
        raise LauncherError(EXIT_USAGE, f"Unknown command {command!r}.")
    except LauncherError as error:
        ctx.log.say(f"ERROR: {error.message}")
        if ctx.log.path:
            ctx.log.say(f"The full log is {ctx.log.path}")
        return error.exit_code
    except KeyboardInterrupt:
        ctx.log.say("Stopped.")
        return EXIT_OK
    finally:
        prune_logs(ctx.paths.logs)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``launcher.py COMMAND [...]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on: list[str] = []
    if argv and argv[0] in PASS_THROUGH:
        argv, passed_on = argv[:1], argv[1:]
    args = build_parser().parse_args(argv)
    dry_run = getattr(args, "dry_run", False)
    ctx = make_context(args.command, dry_run=dry_run)
    return execute(ctx, args.command, passed_on, getattr(args, "reinstall", False))


def split_args(text: str) -> list[str]:
    """Split ``FRAMEPACK_ARGS`` the way a Windows command line splits: double quotes group, backslashes are literal."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.quotes = '"'
    lexer.escape = ""
    return list(lexer)


if __name__ == "__main__":
    sys.exit(main())
