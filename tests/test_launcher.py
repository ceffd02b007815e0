"""The launcher: GPU detection, the PyTorch build it picks, the commands it runs, and its messages on failure.

Nothing here needs a GPU, the network or PyTorch: programs are replaced by a recording fake,
except git, which runs for real on throwaway repositories.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_helper import launcher
from diffusers_helper.launcher import Gpu, LauncherError

REPO = Path(__file__).resolve().parent.parent

# nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader, as real cards answer.
SMI_3060_LAPTOP = "NVIDIA GeForce RTX 3060 Laptop GPU, 8.6, 560.94, 6144 MiB\n"
SMI_3060_LAPTOP_NEW_DRIVER = "NVIDIA GeForce RTX 3060 Laptop GPU, 8.6, 576.52, 6144 MiB\n"
SMI_4090 = "NVIDIA GeForce RTX 4090, 8.9, 572.16, 24564 MiB\n"
SMI_5090 = "NVIDIA GeForce RTX 5090, 12.0, 576.02, 32607 MiB\n"
SMI_5090_OLD_DRIVER = "NVIDIA GeForce RTX 5090, 12.0, 566.36, 32607 MiB\n"
SMI_5090_LINUX = "NVIDIA GeForce RTX 5090, 12.0, 570.133.07, 32607 MiB\n"
SMI_1080TI = "NVIDIA GeForce GTX 1080 Ti, 6.1, 581.57, 11264 MiB\n"  # Pascal: no bfloat16
SMI_T4_LINUX = "Tesla T4, 7.5, 535.104.05, 15360 MiB\n"  # Turing: no bfloat16
SMI_1650 = "NVIDIA GeForce GTX 1650, 7.5, 566.14, 4096 MiB\n"
SMI_NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)
SMI_OLD_DRIVER_ERROR = 'Field "compute_cap" is not a valid field to query.\n\n'
SMI_OLD_DRIVER_1070 = "NVIDIA GeForce GTX 1070, 472.12, 8192 MiB\n"


# ------------------------------------------------------------------------------------------
# parse_nvidia_smi


def test_parse_rtx_3060_laptop():
    assert launcher.parse_nvidia_smi(SMI_3060_LAPTOP) == [Gpu("NVIDIA GeForce RTX 3060 Laptop GPU", (8, 6), "560.94", 6144)]


def test_parse_several_gpus_and_skip_noise():
    text = "WARNING: infoROM is corrupted at gpu 0000:02:00.0\n" + SMI_4090 + "\n" + SMI_5090
    gpus = launcher.parse_nvidia_smi(text)
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 5090"]
    assert [g.compute_capability for g in gpus] == [(8, 9), (12, 0)]
    assert gpus[1].sm == "sm_120" and gpus[1].has_bf16


def test_parse_nounits_and_not_available_fields():
    gpus = launcher.parse_nvidia_smi("Tesla T4, 7.5, 535.104.05, 15360\nNVIDIA A100-SXM4-40GB, [N/A], 550.54.15, [N/A]\n")
    assert gpus[0] == Gpu("Tesla T4", (7, 5), "535.104.05", 15360)
    assert gpus[1].name == "NVIDIA A100-SXM4-40GB" and gpus[1].memory_mib is None
    assert gpus[1].compute_capability == (8, 0) and gpus[1].compute_capability_guessed


def test_parse_old_driver_without_compute_cap_guesses_from_name():
    (gpu,) = launcher.parse_nvidia_smi(SMI_OLD_DRIVER_1070)
    assert gpu == Gpu("NVIDIA GeForce GTX 1070", (6, 1), "472.12", 8192, compute_capability_guessed=True)
    assert "from its name" in gpu.describe()


def test_parse_error_text_gives_no_gpus():
    assert launcher.parse_nvidia_smi(SMI_NO_DRIVER) == []
    assert launcher.parse_nvidia_smi(SMI_OLD_DRIVER_ERROR) == []
    assert launcher.parse_nvidia_smi("No devices were found\n") == []
    assert launcher.parse_nvidia_smi("") == []


@pytest.mark.parametrize(
    "name, cc",
    [
        ("NVIDIA GeForce RTX 5070 Ti", (12, 0)),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", (12, 0)),
        ("NVIDIA B200", (10, 0)),
        ("NVIDIA RTX 5000 Ada Generation", (8, 9)),
        ("Quadro RTX 5000", (7, 5)),
        ("NVIDIA GeForce RTX 4060 Laptop GPU", (8, 9)),
        ("NVIDIA H100 80GB HBM3", (9, 0)),
        ("NVIDIA RTX A4000", (8, 6)),
        ("NVIDIA GeForce RTX 2080 Ti", (7, 5)),
        ("Tesla V100-SXM2-16GB", (7, 0)),
        ("NVIDIA GeForce GTX 1660 SUPER", (7, 5)),
        ("NVIDIA GeForce GTX 970", (5, 2)),
        ("GeForce GTX 780", (3, 5)),
        ("Some Future GPU", None),
    ],
)
def test_compute_capability_from_name(name, cc):
    assert launcher.compute_capability_from_name(name) == cc


class SmiRunner(launcher.Runner):
    """Answers nvidia-smi queries like a driver would."""

    def __init__(self, new_query: tuple[int, str], old_query: tuple[int, str] | None = None):
        self.answers = {launcher.NVIDIA_SMI_FIELDS: new_query, launcher.NVIDIA_SMI_FIELDS_OLD: old_query or (0, "")}
        self.queries: list[str] = []

    def capture(self, command, **_):
        fields = command[1].split("=", 1)[1]
        self.queries.append(fields)
        return launcher.Completed(*self.answers[fields])


def test_detect_gpus_falls_back_to_the_old_query():
    runner = SmiRunner((6, SMI_OLD_DRIVER_ERROR), (0, SMI_OLD_DRIVER_1070))
    probe = launcher.detect_gpus(runner, "nvidia-smi")
    assert runner.queries == [launcher.NVIDIA_SMI_FIELDS, launcher.NVIDIA_SMI_FIELDS_OLD]
    assert probe.gpus[0].compute_capability == (6, 1) and probe.problem is None


def test_detect_gpus_reports_a_broken_driver():
    probe = launcher.detect_gpus(SmiRunner((9, SMI_NO_DRIVER)), "nvidia-smi")
    assert probe.gpus == () and "couldn't communicate with the NVIDIA driver" in probe.problem


def test_detect_gpus_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(launcher, "nvidia_smi_program", lambda environ=None: None)
    probe = launcher.detect_gpus(SmiRunner((0, "")))
    assert probe.gpus == () and "nvidia-smi was not found" in probe.problem


# ------------------------------------------------------------------------------------------
# choose_torch_build


def build_for(smi_text: str, platform: str = "win32") -> launcher.TorchBuild:
    return launcher.choose_torch_build(launcher.parse_nvidia_smi(smi_text), platform)


def test_rtx_3060_laptop_with_a_560_driver_gets_cuda_12_6():
    build = build_for(SMI_3060_LAPTOP)
    assert (build.tag, build.index_url, build.cuda) == ("cu126", "https://download.pytorch.org/whl/cu126", "12.6")
    assert build.error is None and build.warnings == ()
    assert "RTX 3060 Laptop GPU (sm_86)" in build.reason


def test_rtx_3060_laptop_with_a_new_driver_gets_cuda_12_8():
    assert build_for(SMI_3060_LAPTOP_NEW_DRIVER).tag == "cu128"


def test_rtx_4090_gets_cuda_12_8():
    build = build_for(SMI_4090)
    assert (build.tag, build.index_url) == ("cu128", "https://download.pytorch.org/whl/cu128")
    assert build.error is None and build.warnings == ()


@pytest.mark.parametrize("smi, platform", [(SMI_5090, "win32"), (SMI_5090_LINUX, "linux")])
def test_rtx_5090_gets_cuda_12_8(smi, platform):
    build = build_for(smi, platform)
    assert build.tag == "cu128" and build.error is None
    assert "Blackwell" in build.reason and "sm_120" in build.reason
    assert build.requirement == "torch>=2.7"  # the first release with sm_120 kernels


def test_rtx_5090_with_an_old_driver_asks_for_a_driver_update():
    build = build_for(SMI_5090_OLD_DRIVER)
    assert build.tag == "cu128"
    assert build.error == (
        "The NVIDIA driver 566.36 is too old for NVIDIA GeForce RTX 5090: PyTorch for CUDA 12.8 needs driver 570.65 or newer. "
        "Install the latest driver from https://www.nvidia.com/Download/index.aspx (or with the NVIDIA App), "
        "restart the computer, and start FramePack again."
    )


def test_linux_driver_minimum_differs_from_windows():
    assert build_for("NVIDIA GeForce RTX 5090, 12.0, 570.26, 32607 MiB", "linux").error is None
    assert build_for("NVIDIA GeForce RTX 5090, 12.0, 570.26, 32607 MiB", "win32").error is not None


def test_no_gpu_gets_the_cpu_build_with_a_clear_reason():
    build = launcher.choose_torch_build([], "win32")
    assert (build.tag, build.index_url, build.cuda, build.error) == ("cpu", "https://download.pytorch.org/whl/cpu", None, None)
    assert build.reason.startswith("No NVIDIA GPU was found, so PyTorch for the CPU is installed")


def test_gpu_without_bf16_warns():
    build = build_for(SMI_1080TI)
    assert build.tag == "cu126"  # cu128 has no Pascal kernels
    (warning,) = build.warnings
    assert warning.startswith("NVIDIA GeForce GTX 1080 Ti has no bfloat16 support in hardware (compute capability 6.1")
    build = build_for(SMI_T4_LINUX, "linux")
    assert build.tag == "cu126" and "Tesla T4 has no bfloat16 support" in build.warnings[0]


def test_small_gpu_warns_about_memory():
    build = build_for(SMI_1650)
    assert any("4.0 GB of memory; FramePack needs at least 6 GB" in w for w in build.warnings)


def test_old_driver_without_compute_cap_asks_for_update():
    build = build_for(SMI_OLD_DRIVER_1070)
    assert build.tag == "cu126" and "driver 472.12 is too old" in build.error and "527.41" in build.error


def test_unknown_gpu_is_chosen_by_driver():
    assert build_for("NVIDIA Mystery, [N/A], 575.00, 16000 MiB").tag == "cu128"
    assert build_for("NVIDIA Mystery, [N/A], 560.00, 16000 MiB").tag == "cu126"


def test_two_gpus_the_bigger_one_decides():
    build = build_for("NVIDIA GeForce RTX 3060, 8.6, 576.02, 12288 MiB\n" + SMI_5090)
    assert build.tag == "cu128" and "RTX 5090" in build.reason and build.warnings == ()
    build = build_for(SMI_1080TI.replace("581.57", "576.02") + SMI_5090)
    assert build.tag == "cu128"
    assert any("GTX 1080 Ti is not supported by PyTorch for CUDA 12.8" in w for w in build.warnings)


def test_kepler_alone_falls_back_to_cpu():
    build = build_for("GeForce GTX 780, 3.5, 474.14, 3072 MiB")
    assert build.tag == "cpu" and "too old for current PyTorch" in build.warnings[0]


def test_macos_uses_pypi():
    build = launcher.choose_torch_build([], "darwin")
    assert build.tag == "pypi" and build.index_url is None


def test_index_override():
    build = launcher.with_index_override(build_for(SMI_4090), {"FRAMEPACK_TORCH_INDEX_URL": "https://mirror.example/whl/cu128"})
    assert build.index_url == "https://mirror.example/whl/cu128" and "FRAMEPACK_TORCH_INDEX_URL" in build.reason


# ------------------------------------------------------------------------------------------
# install_commands, plan_install


def test_install_commands_for_a_5090():
    build = build_for(SMI_5090)
    commands = launcher.install_commands(r"C:\FP\.venv\Scripts\python.exe", build, r"C:\FP\requirements.txt")
    assert commands == [
        [r"C:\FP\.venv\Scripts\python.exe", "-m", "pip", "install", "torch>=2.7", "--index-url", "https://download.pytorch.org/whl/cu128"],
        [r"C:\FP\.venv\Scripts\python.exe", "-m", "pip", "install", "-r", r"C:\FP\requirements.txt"],
    ]


def test_install_commands_replacing_a_cpu_torch_with_log():
    build = build_for(SMI_4090)
    plan = launcher.InstallPlan(install_torch=True, replace_torch=True, install_requirements=True)
    commands = launcher.install_commands("py", build, "req.txt", plan, log_file="run.log")
    assert commands == [
        ["py", "-m", "pip", "uninstall", "--yes", "torch"],
        ["py", "-m", "pip", "install", "--log", "run.log", "torch>=2.7", "--index-url", "https://download.pytorch.org/whl/cu128"],
        ["py", "-m", "pip", "install", "--log", "run.log", "-r", "req.txt"],
    ]


def test_install_commands_never_mix_indexes_or_install_torchvision():
    for smi in (SMI_3060_LAPTOP, SMI_4090, SMI_5090, ""):
        for command in launcher.install_commands("py", build_for(smi), "req.txt"):
            assert "--extra-index-url" not in command
            assert not any("torchvision" in arg for arg in command)
    assert "torchvision" not in (REPO / "requirements.txt").read_text()


def test_install_commands_for_cpu_and_requirements_only():
    cpu = launcher.choose_torch_build([], "linux")
    assert launcher.install_commands("py", cpu, "r.txt")[0][-2:] == ["--index-url", "https://download.pytorch.org/whl/cpu"]
    only_requirements = launcher.InstallPlan(install_requirements=True)
    assert launcher.install_commands("py", cpu, "r.txt", only_requirements) == [["py", "-m", "pip", "install", "-r", "r.txt"]]


def test_plan_install():
    cu128 = build_for(SMI_4090)
    cpu = launcher.choose_torch_build([], "win32")
    installed = {"torch_build": "cu128", "requirements_sha256": "abc"}
    assert launcher.plan_install(None, cu128, "abc", venv_exists=False) == launcher.InstallPlan(True, True, False, True)
    assert launcher.plan_install(installed, cu128, "abc", venv_exists=True).nothing
    changed = launcher.plan_install(installed, cu128, "new", venv_exists=True)
    assert (changed.install_torch, changed.install_requirements) == (False, True)
    other_build = launcher.plan_install({**installed, "torch_build": "cpu"}, cu128, "abc", venv_exists=True)
    assert other_build.install_torch and other_build.replace_torch
    gpu_vanished = launcher.plan_install(installed, cpu, "abc", venv_exists=True)
    assert gpu_vanished.nothing and "keeping it" in gpu_vanished.notes[0]
    no_marker = launcher.plan_install(None, cu128, "abc", venv_exists=True)
    assert no_marker.install_torch and no_marker.replace_torch
    assert launcher.plan_install(installed, cu128, "abc", venv_exists=True, reinstall=True).replace_torch


# ------------------------------------------------------------------------------------------
# Checks and their messages


def test_python_version_check():
    launcher.check_python_version((3, 10, 0))
    launcher.check_python_version((3, 13, 5))
    for version, shown in (((3, 9, 18), "3.9.18"), ((3, 14, 0), "3.14.0")):
        with pytest.raises(LauncherError) as caught:
            launcher.check_python_version(version)
        assert caught.value.exit_code == launcher.EXIT_PYTHON
        assert caught.value.message.startswith(f"Python {shown} is not supported: FramePack needs Python 3.10 to 3.13.")


def test_check_disk_space():
    assert launcher.check_disk_space("/models", 43, "the models", free=lambda _: 100.0) == 100.0
    with pytest.raises(LauncherError) as caught:
        launcher.check_disk_space("/models", 43, "the models", free=lambda _: 12.34)
    assert caught.value.exit_code == launcher.EXIT_DISK
    assert caught.value.message.startswith("Not enough disk space for the models: 43 GB are needed in /models, but only 12.3 GB are free")


def test_free_gb_of_a_folder_not_made_yet(tmp_path):
    assert launcher.free_gb(tmp_path / "not" / "yet") == pytest.approx(shutil.disk_usage(tmp_path).free / 1e9, rel=0.01)


def test_models_needed(tmp_path):
    assert launcher.models_needed_gb(["--tiny"], tmp_path) == 0
    assert launcher.models_needed_gb([], tmp_path) == launcher.MODELS_GB
    assert launcher.models_needed_gb([], tmp_path, size=lambda _: 40.0) == pytest.approx(launcher.MODELS_GB - 40)
    folders = [str(tmp_path)] * 3
    local = ["--hunyuan", folders[0], "--siglip", folders[1], f"--transformer={folders[2]}"]
    assert launcher.models_needed_gb(local, tmp_path / "hf") == 0
    assert launcher.models_needed_gb(local[:4], tmp_path / "hf") == launcher.MODELS_GB
    per_model = [*local[:4], "--f1-transformer", folders[2]]
    assert launcher.models_needed_gb(per_model, tmp_path / "hf") == 0


def test_check_writable(tmp_path):
    launcher.check_writable(tmp_path / "logs")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LauncherError) as caught:
        launcher.check_writable(blocker / "logs")
    assert caught.value.exit_code == launcher.EXIT_NOT_WRITABLE
    assert "cannot write to" in caught.value.message and "never needs administrator rights" in caught.value.message


def test_path_warnings():
    assert launcher.path_warnings(Path("/home/me/FramePack"), windows=False) == []
    assert launcher.path_warnings(Path(r"C:\FramePack"), windows=True, long_paths_enabled=False) == []
    long = Path("C:/" + "x" * 90)
    assert "characters long" in launcher.path_warnings(long, windows=True, long_paths_enabled=False)[0]
    assert launcher.path_warnings(long, windows=True, long_paths_enabled=True) == []
    assert "OneDrive" in launcher.path_warnings(Path("C:/Users/me/OneDrive/FP"), windows=True, long_paths_enabled=True)[0]


def test_judge_torch_messages():
    cu128, cpu = build_for(SMI_5090), launcher.choose_torch_build([], "win32")
    good = {"version": "2.8.0+cu128", "cuda": "12.8", "available": True, "device": "NVIDIA GeForce RTX 5090", "capability": [12, 0], "kernel": 8.0}
    assert launcher.judge_torch(good, cu128) is None
    assert launcher.judge_torch({"version": "2.8.0+cpu", "cuda": None, "available": False}, cpu) is None
    assert launcher.judge_torch({"error": "ImportError: DLL load failed"}, cu128).startswith("PyTorch was installed but cannot be imported (ImportError: DLL load failed)")
    assert launcher.judge_torch({"version": "2.8.0+cpu", "cuda": None}, cu128).startswith("A PyTorch without CUDA (2.8.0+cpu) is installed")
    assert "torch.cuda.is_available() is False" in launcher.judge_torch({**good, "available": False}, cu128)
    no_kernels = {**good, "version": "2.6.0+cu124", "arch_list": ["sm_50", "sm_90"], "kernel_error": "CUDA error: no kernel image is available for execution on the device"}
    message = launcher.judge_torch(no_kernels, cu128)
    assert message.startswith("PyTorch 2.6.0+cu124 has no kernels for NVIDIA GeForce RTX 5090 (sm_120; it has sm_50, sm_90)")
    assert "Delete the .venv folder" in message


def test_installed_torch_fits():
    cu128, cpu = build_for(SMI_4090), launcher.choose_torch_build([], "linux")
    assert launcher.installed_torch_fits({"version": "2.8.0+cu128", "cuda": "12.8"}, cu128)
    assert not launcher.installed_torch_fits({"version": "2.8.0+cu126", "cuda": "12.6"}, cu128)
    assert launcher.installed_torch_fits({"version": "2.13.0+cpu", "cuda": None}, cpu)
    assert not launcher.installed_torch_fits({"error": "ModuleNotFoundError: No module named 'torch'"}, cpu)


def test_pip_wheel_url():
    data = {"urls": [{"packagetype": "sdist", "filename": "pip-26.3.tar.gz", "url": "https://files/pip-26.3.tar.gz"},
                     {"packagetype": "bdist_wheel", "filename": "pip-26.3-py3-none-any.whl", "url": "https://files/pip-26.3-py3-none-any.whl"}]}
    assert launcher.pip_wheel_url(data) == "https://files/pip-26.3-py3-none-any.whl"
    data["urls"][1]["url"] = "../../packages/pip-26.3-py3-none-any.whl"
    assert launcher.pip_wheel_url(data, "https://mirror/pypi/pip/json") == "https://mirror/packages/pip-26.3-py3-none-any.whl"
    assert launcher.pip_wheel_url({"urls": []}) is None


def test_split_args_keeps_windows_paths():
    assert launcher.split_args(r'--hunyuan "D:\my models\HunyuanVideo" --vram low') == ["--hunyuan", r"D:\my models\HunyuanVideo", "--vram", "low"]
    assert launcher.split_args("") == []


def test_app_environment_keeps_what_is_set(tmp_path):
    env = launcher.app_environment(tmp_path, {"HF_HOME": "/big/disk/hf", "PYTHONHOME": "/stray", "PATH": "/bin"})
    assert env["HF_HOME"] == "/big/disk/hf" and "PYTHONHOME" not in env and env["PATH"] == "/bin"
    assert env["PIP_CACHE_DIR"] == str(tmp_path / "cache" / "pip")
    assert (env["PYTHONUTF8"], env["PYTHONNOUSERSITE"]) == ("1", "1")
    assert launcher.app_environment(tmp_path, {})["HF_HOME"] == str(tmp_path / "hf_download")


def test_environment_bat_sets_what_the_launcher_sets_on_linux():
    text = (REPO / "environment.bat").read_text()
    bat = dict(re.findall(r'set "([A-Z0-9_]+)=([^"]*)"', text))
    for name, value in launcher.app_environment(Path("APP"), {}).items():
        if name in ("PYTHONUNBUFFERED",):  # only the app needs it, and the launcher sets it there
            continue
        assert name in bat, name
        assert bat[name].replace("%FRAMEPACK_HOME%", "APP").replace("\\", "/") == value.replace("\\", "/"), name


def test_bat_files_are_crlf_ascii_and_thin():
    for name in ("run.bat", "update.bat", "environment.bat"):
        data = (REPO / name).read_bytes()
        assert data.count(b"\n") == data.count(b"\r\n") > 0, f"{name} must have CRLF line endings"
        data.decode("ascii")
        assert b"||" not in data.replace(b'"||"', b""), f"{name}: Wine's cmd mishandles ||"
    for name in ("run.bat", "update.bat"):
        text = (REPO / name).read_text()
        assert 'call "%~dp0environment.bat"' in text
        assert "diffusers_helper\\launcher.py" in text


def test_ci_runs_the_readme_test_command():
    """CI runs what the README tells Linux users to run, not a command of its own."""
    command = "python3 -m diffusers_helper.launcher test"
    assert f"```bash\n{command}\n```" in (REPO / "README.md").read_text()
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert any(line == command or line.startswith(command + " ") for line in lines)
    assert not any(re.match(r"(python3? -m )?pytest\b", line) for line in lines)


def test_log_files_are_pruned(tmp_path):
    for day in range(1, 26):
        (tmp_path / f"run-202611{day:02d}-120000.log").write_text("x")
    (tmp_path / "update-20261101-120000.log").write_text("x")
    for day in range(1, 6):
        (tmp_path / f"pip-202611{day:02d}-120000.log").write_text("x")
    launcher.prune_logs(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 20 + 1 + 3 and "run-20261105-120000.log" not in names and "run-20261106-120000.log" in names
    assert [n for n in names if n.startswith("pip-")] == ["pip-20261103-120000.log", "pip-20261104-120000.log", "pip-20261105-120000.log"]


# ------------------------------------------------------------------------------------------
# Whole commands with the programs replaced


class FakeRunner(launcher.Runner):
    """Plays nvidia-smi, python -m venv, pip, the PyTorch probe and the app; records every command."""

    def __init__(self, smi=SMI_4090, pip_status=0, torch=None, app_status=0):
        self.smi, self.pip_status, self.app_status = smi, pip_status, app_status
        self.torch = torch or {"version": "2.8.0+cu128", "cuda": "12.8", "available": True, "device": "NVIDIA GeForce RTX 4090", "capability": [8, 9], "kernel": 8.0}
        self.calls: list[tuple[str, list[str]]] = []

    def capture(self, command, **_):
        command = [str(c) for c in command]
        self.calls.append(("capture", command))
        if any(c.startswith("--query-gpu=") for c in command):
            return launcher.Completed(0, self.smi) if self.smi is not None else launcher.Completed(9, SMI_NO_DRIVER)
        if command[1:3] == ["-m", "venv"]:
            python = Path(command[-1]) / "bin" / "python"
            python.parent.mkdir(parents=True)
            python.write_text("")
            return launcher.Completed(0, "")
        if command[1] == "-c" and "TORCH_PROBE" in command[2]:
            return launcher.Completed(0, "some warning\nTORCH_PROBE " + json.dumps(self.torch) + "\n")
        return launcher.Completed(0, "")

    def inherit(self, command, **_):
        command = [str(c) for c in command]
        self.calls.append(("inherit", command))
        return self.pip_status

    def tee(self, command, log, **_):
        self.calls.append(("tee", [str(c) for c in command]))
        log.echo_output("Running on local URL:  http://127.0.0.1:7860\n")
        return self.app_status

    def commands(self, kind: str) -> list[list[str]]:
        return [command for k, command in self.calls if k == kind]


@pytest.fixture
def app(tmp_path):
    folder = tmp_path / "Frame Pack ü"
    folder.mkdir()
    shutil.copy(REPO / "requirements.txt", folder / "requirements.txt")
    (folder / "demo_gradio.py").write_text("")
    return folder


def run_command(app, runner, command, passed_on=(), environ=None, free=500.0, platform="win32"):
    out = io.StringIO()
    ctx = launcher.make_context(command, app, {"PATH": os.environ.get("PATH", ""), **(environ or {})}, runner=runner,
                                nvidia_smi="nvidia-smi", free_space=lambda _: free, platform=platform)
    ctx.log._stream = out
    code = launcher.execute(ctx, command, passed_on)
    return code, out.getvalue(), ctx


def test_first_run_installs_then_starts_the_app(app):
    runner = FakeRunner()
    code, out, ctx = run_command(app, runner, "run", ["--port", "7861"])
    assert code == launcher.EXIT_OK, out
    venv_python = str(app / ".venv" / "bin" / "python")
    pip_log = Path(runner.commands("inherit")[0][5])  # pip keeps its own, verbose, log
    assert pip_log.parent == app / "logs" and pip_log.name.startswith("pip-")
    assert runner.commands("inherit") == launcher.install_commands(venv_python, build_for(SMI_4090), app / "requirements.txt", log_file=pip_log)
    assert runner.commands("capture")[1] == [sys.executable, "-m", "venv", str(app / ".venv")]
    assert runner.commands("tee") == [[venv_python, str(app / "demo_gradio.py"), "--server", "127.0.0.1", "--inbrowser", "--port", "7861"]]
    assert "GPU: NVIDIA GeForce RTX 4090, 24 GB, compute capability 8.9, driver 572.16" in out
    assert "PyTorch 2.8.0+cu128 works (CUDA 12.8 on NVIDIA GeForce RTX 4090)." in out
    marker = json.loads((app / ".venv" / launcher.MARKER_NAME).read_text())
    assert marker["torch_build"] == "cu128"
    # Everything the user saw is in the log, app output included.
    log_text = ctx.log.path.read_text(encoding="utf-8")
    assert ctx.log.path.parent == app / "logs" and "Running on local URL" in log_text and "PyTorch: cu128" in log_text


def test_second_run_installs_nothing(app):
    run_command(app, FakeRunner(), "run")
    runner = FakeRunner()
    code, out, _ = run_command(app, runner, "run", environ={"FRAMEPACK_ARGS": '--hunyuan "D:\\my models\\hy"'})
    assert code == 0 and runner.commands("inherit") == [] and "Python packages are installed." in out
    assert runner.commands("tee")[0][-2:] == ["--hunyuan", "D:\\my models\\hy"]


def test_changed_requirements_are_installed_again(app):
    run_command(app, FakeRunner(), "run")
    with open(app / "requirements.txt", "a") as file:
        file.write("rich>=13\n")
    runner = FakeRunner()
    code, out, _ = run_command(app, runner, "setup")
    (command,) = runner.commands("inherit")
    assert code == 0 and command[3:4] + command[6:] == ["install", "-r", str(app / "requirements.txt")]
    assert "requirements.txt changed since the last install" in out


def test_driver_too_old_stops_before_installing(app):
    runner = FakeRunner(smi=SMI_5090_OLD_DRIVER)
    code, out, ctx = run_command(app, runner, "run")
    assert code == launcher.EXIT_DRIVER
    assert runner.commands("inherit") == [] and runner.commands("tee") == []
    assert "ERROR: The NVIDIA driver 566.36 is too old for NVIDIA GeForce RTX 5090" in out
    assert f"The full log is {ctx.log.path}" in out
    assert "ERROR: The NVIDIA driver 566.36" in ctx.log.path.read_text(encoding="utf-8")


def test_pip_failure(app):
    code, out, _ = run_command(app, FakeRunner(pip_status=1), "run")
    assert code == launcher.EXIT_INSTALL
    assert "ERROR: PyTorch could not be installed (pip exited with status 1). Check the internet connection" in out
    assert re.search(r"pip's detailed log is .*pip-\d{8}-\d{6}\.log\.", out)


def test_cpu_torch_on_a_gpu_machine_is_reported(app):
    code, out, _ = run_command(app, FakeRunner(torch={"version": "2.8.0+cpu", "cuda": None, "available": False}), "run")
    assert code == launcher.EXIT_TORCH and "ERROR: A PyTorch without CUDA (2.8.0+cpu) is installed" in out
    assert not (app / ".venv" / launcher.MARKER_NAME).exists()  # tried again next time


def test_no_gpu_installs_cpu_build_and_says_so(app):
    runner = FakeRunner(smi=None, torch={"version": "2.8.0+cpu", "cuda": None, "available": False})
    code, out, _ = run_command(app, runner, "setup", platform="linux")
    assert code == 0
    assert "GPU: none (nvidia-smi found no usable GPU: NVIDIA-SMI has failed" in out
    assert "PyTorch: cpu (No NVIDIA GPU was found" in out
    assert runner.commands("inherit")[0][-2:] == ["--index-url", "https://download.pytorch.org/whl/cpu"]


def test_a_hand_made_venv_with_a_fitting_torch_is_kept(app):
    (app / ".venv" / "bin").mkdir(parents=True)
    (app / ".venv" / "bin" / "python").write_text("")
    runner = FakeRunner()
    code, out, _ = run_command(app, runner, "setup")
    assert code == 0 and "PyTorch 2.8.0+cu128 is already installed and fits" in out
    assert [c[3] for c in runner.commands("inherit")] == ["install"] and runner.commands("inherit")[0][-2] == "-r"


def test_a_broken_venv_is_made_again_and_filled(app):
    run_command(app, FakeRunner(), "setup")

    class MovedVenv(FakeRunner):
        def capture(self, command, **kwargs):
            if list(map(str, command))[1:] == ["-c", "import sys"]:
                self.calls.append(("capture", [str(c) for c in command]))
                return launcher.Completed(101, "did not find executable")
            return super().capture(command, **kwargs)

    runner = MovedVenv()
    code, out, _ = run_command(app, runner, "run")
    assert code == 0, out
    assert "does not start (was the folder moved?); making it again." in out
    assert [c[1:3] for c in runner.commands("capture") if c[1:3] == ["-m", "venv"]] == [["-m", "venv"]]
    assert [c[3] for c in runner.commands("inherit")] == ["install", "install"]  # torch, then the requirements


def test_not_enough_disk_for_install_or_models(app):
    code, out, _ = run_command(app, FakeRunner(), "run", free=5.0)
    assert code == launcher.EXIT_DISK and "ERROR: Not enough disk space for PyTorch and the other Python packages: 9 GB" in out
    run_command(app, FakeRunner(), "setup")
    code, out, _ = run_command(app, FakeRunner(), "run", free=20.0)
    assert code == launcher.EXIT_DISK and "ERROR: Not enough disk space for the models (about 43 GB in all): 43 GB are needed" in out
    code, out, _ = run_command(app, FakeRunner(), "run", ["--tiny"], free=20.0)
    assert code == 0 and "downloads the models" not in out
    code, out, _ = run_command(app, FakeRunner(), "run", free=50.0)
    assert code == 0 and "The first video downloads the models (up to 43 GB) into" in out


def test_app_failure_and_missing_app(app):
    code, out, _ = run_command(app, FakeRunner(app_status=1), "run")
    assert code == launcher.EXIT_APP and "ERROR: FramePack stopped with an error (status 1)" in out
    (app / "demo_gradio.py").unlink()
    code, out, _ = run_command(app, FakeRunner(), "run")
    assert code == launcher.EXIT_APP and "demo_gradio.py is missing: the download is incomplete" in out


def test_dry_run_prints_commands_and_changes_nothing(app):
    runner = FakeRunner()
    out_stream = io.StringIO()
    ctx = launcher.make_context("setup", app, {"PATH": ""}, dry_run=True, runner=runner, nvidia_smi="nvidia-smi", free_space=lambda _: 500.0, platform="win32")
    ctx.log._stream = out_stream
    assert launcher.execute(ctx, "setup") == 0
    out = out_stream.getvalue()
    assert "-m venv" in out and "--index-url https://download.pytorch.org/whl/cu128" in out
    assert runner.commands("inherit") == [] and not (app / ".venv").exists() and ctx.log.path is None


def test_check_reports(app):
    code, out, _ = run_command(app, FakeRunner(), "check")
    assert code == 0 and "Not installed yet" in out and "PyTorch: cu128" in out
    code, out, _ = run_command(app, FakeRunner(smi=SMI_5090_OLD_DRIVER), "check")
    assert code == launcher.EXIT_DRIVER and "ERROR: The NVIDIA driver 566.36 is too old" in out


def test_test_command_adds_pytest_and_passes_arguments(app):
    class NoPytest(FakeRunner):
        def capture(self, command, **kwargs):
            if list(command)[1:] == ["-c", "import pytest"]:
                self.calls.append(("capture", list(command)))
                return launcher.Completed(1, "ModuleNotFoundError")
            return super().capture(command, **kwargs)

    runner = NoPytest()
    code, _, _ = run_command(app, runner, "test", ["-k", "launcher"])
    venv_python = str(app / ".venv" / "bin" / "python")
    assert code == 0
    assert runner.commands("inherit")[-2:] == [[venv_python, "-m", "pip", "install", "pytest>=8,<10"], [venv_python, "-m", "pytest", "-k", "launcher"]]
    # With requirements-dev.txt, that is what is installed; and the default is the whole suite.
    (app / "requirements-dev.txt").write_text("pytest>=8,<10\n")
    runner = FakeRunner()
    code, _, _ = run_command(app, runner, "test")
    assert code == 0
    assert runner.commands("inherit")[-2:] == [[venv_python, "-m", "pip", "install", "-r", str(app / "requirements-dev.txt")], [venv_python, "-m", "pytest", "-q", "tests"]]


def test_ctrl_c_stops_quietly(app):
    class Interrupted(FakeRunner):
        def tee(self, command, log, **_):
            raise KeyboardInterrupt

    run_command(app, FakeRunner(), "setup")
    code, out, _ = run_command(app, Interrupted(), "run")
    assert code == 0 and out.rstrip().endswith("Stopped.") and "ERROR" not in out


def test_tee_copies_the_output_to_console_and_log(tmp_path):
    out = io.StringIO()
    log = launcher.Log(tmp_path / "run.log", stream=out)
    script = "import sys; sys.stdout.write('caf\\u00e9 1\\n'); sys.stdout.flush(); sys.stderr.write('two\\n'); sys.exit(3)"
    code = launcher.Runner().tee([sys.executable, "-c", script], log, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert code == 3
    assert out.getvalue().splitlines() == ["café 1", "two"]
    assert (tmp_path / "run.log").read_text(encoding="utf-8").splitlines() == ["café 1", "two"]


# ------------------------------------------------------------------------------------------
# The module itself


def test_runs_by_path_without_torch_and_without_shadowing():
    done = subprocess.run([sys.executable, str(REPO / "diffusers_helper" / "launcher.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "setup" in done.stdout
    probe = "import sys, diffusers_helper.launcher; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        launcher.main(["fly"])
    assert caught.value.code == launcher.EXIT_USAGE


# ------------------------------------------------------------------------------------------
# update_code, against real git repositories


def git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def checkout(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q", "-b", "main")
    (upstream / "demo_gradio.py").write_text("v1\n")
    (upstream / "README.md").write_text("readme v1\n")
    git(upstream, "add", ".")
    git(upstream, "commit", "-q", "-m", "v1")
    clone = tmp_path / "Frame Pack"
    subprocess.run(["git", "clone", "-q", str(upstream), str(clone)], check=True)

    def publish(name, text):
        (upstream / name).write_text(text)
        git(upstream, "add", name)
        git(upstream, "commit", "-q", "-m", f"change {name}")

    return clone, publish


def update(clone):
    return launcher.update_code(clone, launcher.Runner(), dict(os.environ), now=__import__("datetime").datetime(2026, 1, 2, 3, 4, 5))


def test_update_already_current(checkout):
    clone, _ = checkout
    result = update(clone)
    assert not result.changed and result.messages == ("Already up to date with origin/main.",)


def test_update_keeps_edits_that_do_not_conflict(checkout):
    clone, publish = checkout
    publish("demo_gradio.py", "v2\n")
    (clone / "README.md").write_text("my notes\n")
    result = update(clone)
    assert result.changed and result.stash is None
    assert (clone / "demo_gradio.py").read_text() == "v2\n" and (clone / "README.md").read_text() == "my notes\n"
    assert result.messages[0].startswith("Updated ") and "(1 new commit(s) from origin/main)" in result.messages[0]
    assert "Your changes to README.md did not conflict and are still in place." in result.messages


def test_update_sets_conflicting_edits_aside_and_says_so(checkout):
    clone, publish = checkout
    publish("demo_gradio.py", "v2\n")
    (clone / "demo_gradio.py").write_text("my tweak\n")
    result = update(clone)
    assert (clone / "demo_gradio.py").read_text() == "v2\n"
    assert result.stash == "framepack update 20260102-030405"
    assert "framepack update 20260102-030405" in git(clone, "stash", "list")
    assert any(m.startswith("Your changes to demo_gradio.py conflicted with the update, so they were set aside with git stash") for m in result.messages)
    git(clone, "checkout", "stash@{0}", "--", "demo_gradio.py")
    assert (clone / "demo_gradio.py").read_text() == "my tweak\n"


def test_update_keeps_local_commits_on_a_branch(checkout):
    clone, publish = checkout
    publish("demo_gradio.py", "v2\n")
    (clone / "README.md").write_text("committed locally\n")
    git(clone, "commit", "-q", "-am", "local")
    result = update(clone)
    assert result.backup_branch == "framepack-backup-20260102-030405"
    assert (clone / "demo_gradio.py").read_text() == "v2\n" and (clone / "README.md").read_text() == "readme v1\n"
    assert git(clone, "show", "framepack-backup-20260102-030405:README.md") == "committed locally\n"


def test_update_untracked_file_in_the_way(checkout):
    clone, publish = checkout
    publish("user.bat", "new upstream file\n")
    (clone / "user.bat").write_text("mine\n")
    result = update(clone)
    assert (clone / "user.bat").read_text() == "new upstream file\n" and result.stash


def test_update_outside_a_checkout(tmp_path):
    with pytest.raises(LauncherError) as caught:
        update(tmp_path)
    assert caught.value.exit_code == launcher.EXIT_UPDATE and "is not a git checkout (it was probably downloaded as a ZIP)" in caught.value.message


def test_update_turns_a_zip_download_into_a_checkout(checkout, tmp_path):
    clone, publish = checkout
    upstream = clone.parent / "upstream"
    unpacked = tmp_path / "FramePack from zip"
    unpacked.mkdir()
    subprocess.run(f"git archive HEAD | tar -x -C '{unpacked}'", shell=True, cwd=upstream, check=True)
    publish("demo_gradio.py", "v2\n")
    (unpacked / "README.md").write_text("my edit\n")
    (unpacked / "user.bat").write_text("mine\n")
    result = launcher.update_code(unpacked, launcher.Runner(), {**os.environ, "FRAMEPACK_REPO_URL": str(upstream)})
    assert result.changed
    assert result.messages[0] == f"This folder was not a git checkout (a ZIP download); it now is one, of {upstream} (main)."
    assert (unpacked / "demo_gradio.py").read_text() == "v2\n" and (unpacked / "README.md").read_text() == "readme v1\n"
    assert (unpacked / "user.bat").read_text() == "mine\n"
    assert "files of the ZIP download" in git(unpacked, "stash", "list")
    assert git(unpacked, "stash", "show", "-p").count("+my edit") == 1
    assert launcher.update_code(unpacked, launcher.Runner(), dict(os.environ)).messages == ("Already up to date with origin/main.",)


def test_update_without_network_or_git(checkout, monkeypatch):
    clone, _ = checkout
    git(clone, "remote", "set-url", "origin", str(clone.parent / "gone"))
    with pytest.raises(LauncherError) as caught:
        update(clone)
    assert caught.value.exit_code == launcher.EXIT_UPDATE and caught.value.message.startswith("git fetch failed:")

    class NoGit(launcher.Runner):
        def capture(self, command, **_):
            raise FileNotFoundError(2, "No such file or directory", command[0])

    with pytest.raises(LauncherError) as caught:
        launcher.update_code(clone, NoGit(), {})
    assert "Install Git from https://git-scm.com/downloads" in caught.value.message


def test_update_command_then_runs_the_new_launchers_setup(checkout):
    clone, publish = checkout
    publish("demo_gradio.py", "v2\n")

    class Recording(launcher.Runner):
        inherited: list = []

        def inherit(self, command, **_):
            self.inherited.append([str(c) for c in command])
            return launcher.EXIT_INSTALL

    out = io.StringIO()
    ctx = launcher.make_context("update", clone, dict(os.environ), runner=Recording())
    ctx.log._stream = out
    code = launcher.execute(ctx, "update")
    assert Recording.inherited == [[sys.executable, str(clone / "diffusers_helper" / "launcher.py"), "setup"]]
    assert code == launcher.EXIT_INSTALL and "ERROR: The code was updated, but installing the packages failed" in out.getvalue()
    assert out.getvalue().splitlines()[5].startswith("Updated ")
