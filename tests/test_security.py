"""Nobody gets in: where the app listens, logins, which files a request can reach, what is loaded, what is printed.

The app runs in this process on 127.0.0.1 (or as `python demo_gradio.py` in a subprocess where
the listening socket itself is checked) with the tiny models. Requests are crafted by hand with
httpx, the way an attacker on the network would send them, besides gradio_client.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from appkit import (SMALL, final_video, form, free_port, progress_message, progress_state, running_app, save_noise_image,
                    upload)
from diffusers_helper.app import (RefuseRemoteFiles, build_parser, config_from_args, exposure_warning, launch_options,
                                  parse_args)

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is needed to drive the app")
from gradio_client import Client, handle_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECRET = "TOP-SECRET-" + secrets.token_hex(8)
STAMPED = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}-\d{3}(_\d+)?\.(mp4|json|png|latents\.safetensors|part\d{3}\.mp4)$")


@pytest.fixture(scope="module")
def start_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "start.png"
    save_noise_image(path, seed=3, size=(64, 64))
    return path


@pytest.fixture(scope="module")
def app(tiny_sources, tmp_path_factory, start_image):
    """The app, one finished job in its outputs, and secrets beside and linked from the outputs folder."""
    root = tmp_path_factory.mktemp("security")
    outputs = root / "outputs"
    secret = root / "secret.txt"
    secret.write_text(SECRET)
    with running_app(outputs, tiny_sources) as (url, _demo):
        result = Client(url, verbose=False).predict(handle_file(str(start_image)), *form(), api_name="/generate")
        video = final_video(result)
        # links placed in the outputs folder that point outside it
        (outputs / "link.txt").symlink_to(secret)
        (outputs / "link.mp4").symlink_to(secret)
        (outputs / "escape").symlink_to(root, target_is_directory=True)
        yield url, outputs, secret, video


def _wait_for_page(proc: subprocess.Popen, port: int, timeout: float = 120) -> None:
    started = time.monotonic()
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "the app exited"
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
            return
        except httpx.HTTPError:
            assert time.monotonic() - started < timeout, "the page did not open"
            time.sleep(0.2)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _remote, state = line.split()[1:4]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if width == 8:
                    found.add(".".join(str(b) for b in raw[::-1]))
                else:
                    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                    found.add(":".join(w.hex() for w in words))
    return found


def _start_demo(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "FRAMEPACK_TINY_CACHE": str(tmp_path / "tiny-not-built"), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "demo_gradio.py", "--tiny", "--device", "cpu", "--port", str(port),
         "--outputs", str(tmp_path / "out"), *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


# ---------------------------------------------------------------------------------------------
# Where it listens, and logins


@pytest.mark.slow
def test_by_default_the_app_listens_on_this_computer_only_and_warns_about_nothing(tmp_path):
    proc, port = _start_demo(tmp_path)
    try:
        _wait_for_page(proc, port)
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        out = _stop(proc)
    assert "WARNING" not in out


@pytest.mark.slow
def test_listening_on_all_addresses_warns_and_the_login_is_required(tmp_path):
    logins = tmp_path / "logins.txt"
    logins.write_text("# who may use the app\n\nalice:wonder land:1\n")
    proc, port = _start_demo(tmp_path, "--server", "0.0.0.0", "--auth-file", str(logins))
    try:
        _wait_for_page(proc, port)
        assert _listening_addresses(port) & {"0.0.0.0", "0000:0000:0000:0000:0000:0000:0000:0000"}
        base = f"http://127.0.0.1:{port}/"
        # without the login: no API, no files
        assert httpx.get(f"{base}config").status_code in (401, 403)
        assert httpx.get(f"{base}gradio_api/info").status_code in (401, 403)
        with pytest.raises(Exception):
            Client(base, verbose=False)
        wrong = httpx.post(f"{base}login", data={"username": "alice", "password": "wrong"})
        assert wrong.status_code in (400, 401)
        # with it (the password may contain ':' and spaces)
        c = Client(base, auth=("alice", "wonder land:1"), verbose=False)
        assert "/generate" in c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    finally:
        out = _stop(proc)
    assert "WARNING" in out and "0.0.0.0" in out and "--auth-file" in out
    assert "wonder land" not in out  # the password is not echoed


def test_share_warns_and_passes_the_logins_to_gradio(monkeypatch, capsys, tmp_path):
    import gradio as gr

    from diffusers_helper import app as app_module

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **options: launched.update(options))
    app_module.main(["--share", "--tiny", "--outputs", str(tmp_path / "o")])
    warning = capsys.readouterr().err
    assert "WARNING" in warning and "gradio.live" in warning and "No login is required" in warning
    assert launched["share"] is True and launched["auth"] is None and launched["server_name"] == "127.0.0.1"

    app_module.main(["--share", "--auth", "bob:pw1", "--auth", "carol:pw2", "--outputs", str(tmp_path / "o")])
    warning = capsys.readouterr().err
    assert "Only the logins" in warning and "pw1" not in warning
    assert launched["auth"] == [("bob", "pw1"), ("carol", "pw2")]
    # --outputs is the only folder of ours that is served
    assert launched["allowed_paths"] == [str((tmp_path / "o").resolve())]


@pytest.mark.parametrize("flags, fragment", [
    (["--auth", "nopassword"], "USER:PASSWORD"),
    (["--auth", ":pw"], "USER:PASSWORD"),
    (["--auth-file", "/nonexistent/logins.txt"], "can't be read"),
])
def test_malformed_logins_stop_before_the_page_opens(flags, fragment, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(flags)
    assert exited.value.code == 2 and fragment in capsys.readouterr().err


def test_an_empty_login_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody\n")
    with pytest.raises(SystemExit):
        parse_args(["--auth-file", str(empty)])
    assert "no USER:PASSWORD line" in capsys.readouterr().err


def test_no_warning_for_local_addresses():
    for server in ("127.0.0.1", "localhost"):
        args = build_parser().parse_args(["--server", server])
        assert exposure_warning(args) is None
        assert launch_options(args, config_from_args(args))["auth"] is None


# ---------------------------------------------------------------------------------------------
# Which files a request can reach


def _fetch(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, timeout=30)


@pytest.mark.slow
def test_the_outputs_are_served(app):
    url, outputs, _secret, video = app
    job_video = outputs / video.name if (outputs / video.name).exists() else next(outputs.glob("*.mp4"))
    response = _fetch(url, f"gradio_api/file={job_video}")
    assert response.status_code == 200 and response.content == job_video.read_bytes()


@pytest.mark.slow
def test_no_request_reads_a_file_outside_the_outputs_folder(app, tiny_sources):
    url, outputs, secret, _video = app
    targets = [
        str(secret), "/etc/passwd", "/proc/self/environ",
        f"{outputs}/../secret.txt", f"{outputs}/../../{secret.parent.name}/secret.txt",
        "../secret.txt", "../../../../../../etc/passwd", "secret.txt",
        f"{outputs}/link.txt", f"{outputs}/link.mp4", f"{outputs}/escape/secret.txt",
        f"{outputs}%2F..%2Fsecret.txt", "%2e%2e/%2e%2e/%2e%2e/etc/passwd", f"{outputs}/..%2fsecret.txt",
        str(REPO / "README.md"), str(REPO / "diffusers_helper" / "app.py"), "README.md", "demo_gradio.py",
        str(Path(tiny_sources.hunyuan) / "vae" / "config.json"),
        "http://127.0.0.1/etc/passwd", f"file://{secret}",
    ]
    for prefix in ("gradio_api/file=", "gradio_api/file/", "file=", "file/"):
        for target in targets:
            response = _fetch(url, prefix + target)
            assert response.status_code != 200 or SECRET not in response.text and "root:" not in response.text, (
                prefix, target, response.status_code)
            assert SECRET not in response.text and "root:x:0" not in response.text, (prefix, target)
            assert response.status_code in (400, 403, 404, 405), (prefix, target, response.status_code)


@pytest.mark.slow
def test_the_file_route_fetches_no_urls_for_visitors(app):
    """Gradio's file route would fetch public URLs for anyone; the app refuses before any request leaves."""
    url, _outputs, _secret, _video = app
    targets = ["https://pypi.org/simple/", "http://example.com/", "HTTPS://pypi.org/", "https:%2F%2Fpypi.org/",
               " https://pypi.org/", "ftp://example.com/x"]
    for prefix in ("gradio_api/file=", "file="):
        for target in targets:
            response = _fetch(url, prefix + target)
            assert response.status_code == 403 and "does not fetch URLs" in response.text, (prefix, target)
    # the page's own files are still served, and demo_gradio.py launches with the same guard
    assert _fetch(url, "gradio_api/file=" + str(_video)).status_code == 200
    args = parse_args(["--outputs", str(_outputs)])
    middleware = launch_options(args, config_from_args(args))["app_kwargs"]["middleware"]
    assert [m.cls for m in middleware] == [RefuseRemoteFiles]


@pytest.mark.slow
def test_api_inputs_cannot_name_files_on_the_server(app):
    url, outputs, secret, video = app
    c = Client(url, verbose=False)
    # an image input that is a path on the server, not an upload
    for path in (str(secret), str(video)):
        with pytest.raises(Exception) as caught:
            c.predict({"path": path, "meta": {"_type": "gradio.FileData"}}, *form(), api_name="/generate")
        assert SECRET not in str(caught.value)
    # names of past outputs that point elsewhere
    elsewhere = secret.parent / "elsewhere.json"
    elsewhere.write_text(json.dumps({"settings": SMALL.to_dict(), "status": "finished", "leak": SECRET}))
    (outputs / "linked.json").symlink_to(elsewhere)
    try:
        for stem in ("../secret", "/etc/passwd", "..", ".", "escape/secret", ".hidden", "linked", "link"):
            for endpoint in ("/show_output", "/load_settings", "/resume"):
                with pytest.raises(Exception) as caught:
                    c.predict(stem, api_name=endpoint)
                text = str(caught.value)
                assert SECRET not in text and ("Unknown output" in text or "no longer in the outputs folder" in text), (
                    stem, endpoint, text)
        listing = c.predict(None, api_name="/list_outputs")
        assert "linked" not in json.dumps(listing) and "link" not in [v for _, v in listing.get("choices", [])]
    finally:
        (outputs / "linked.json").unlink()


@pytest.mark.slow
def test_uploads_cannot_be_written_outside_gradios_upload_folder(app, tmp_path):
    url, outputs, secret, _video = app
    local = tmp_path / "payload.txt"
    local.write_text("payload")
    target = Path("/tmp") / f"pwned-{secrets.token_hex(4)}.txt"
    for name in (f"../../../../..{target}", str(target), f"..\\..\\{target.name}", f"{outputs}/evil.json"):
        stored = Path(upload(url, local, name=name))
        assert stored.resolve().is_relative_to(Path(os.environ.get("GRADIO_TEMP_DIR", "/tmp/gradio")).resolve())
    assert not target.exists() and not (outputs / "evil.json").exists()
    assert not (outputs.parent / target.name).exists()


@pytest.mark.slow
def test_output_names_never_come_from_user_input(app, start_image, tmp_path):
    url, outputs, secret, _video = app
    before_parent = sorted(p.name for p in outputs.parent.iterdir())
    sneaky = tmp_path / "..%2F..%2Fevil name.png"
    shutil.copy(start_image, sneaky)
    result = Client(url, verbose=False).predict(
        handle_file(str(sneaky)), *form(prompt="../../evil/../../x; rm -rf /"), api_name="/generate")
    assert progress_state(result[2]) == "finished"
    ours = [p.name for p in outputs.iterdir() if not p.is_symlink()]
    assert ours and all(STAMPED.match(name) for name in ours), ours
    assert sorted(p.name for p in outputs.parent.iterdir()) == before_parent


# ---------------------------------------------------------------------------------------------
# What is loaded


def _pickle_only_transformer(tiny_sources, folder: Path) -> Path:
    """A transformer folder whose weights exist only as a pickled PyTorch checkpoint (.bin)."""
    from safetensors.torch import load_file

    source = Path(tiny_sources.transformer("framepack"))
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    state = {}
    for shard in source.glob("*.safetensors"):
        state.update(load_file(str(shard)))
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    torch.save(state, folder / "diffusion_pytorch_model.pt")
    return folder


@pytest.mark.slow
def test_a_pickled_checkpoint_is_refused_without_being_opened(tiny_sources, tmp_path, start_image, monkeypatch):
    from diffusers_helper.loading import SourceError, check_sources, load_transformer

    folder = _pickle_only_transformer(tiny_sources, tmp_path / "pickled")
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or pytest.fail("torch.load was called"))
    with pytest.raises(SourceError) as caught:
        load_transformer(str(folder), "cpu")
    assert "diffusion_pytorch_model.safetensors" in str(caught.value) and str(folder) in str(caught.value)
    with pytest.raises(SourceError):
        check_sources(tiny_sources.with_transformer("framepack", str(folder)), "framepack")
    # through the page: the job fails with the message, nothing is written
    outputs = tmp_path / "out"
    with running_app(outputs, tiny_sources.with_transformer("framepack", str(folder))) as (url, _demo):
        result = Client(url, verbose=False).predict(handle_file(str(start_image)), *form(), api_name="/generate")
    assert progress_state(result[2]) == "failed" and "diffusion_pytorch_model.safetensors" in progress_message(result[2])
    assert not outputs.exists() or not any(outputs.iterdir())
    # through the command line: a one-line error, exit status 2
    cli = subprocess.run(
        [sys.executable, "-m", "diffusers_helper", "generate", "--image", str(start_image), "--prompt", "x",
         "--output", str(tmp_path / "cli.mp4"), "--device", "cpu", "--hunyuan", str(tiny_sources.hunyuan),
         "--siglip", str(tiny_sources.siglip), "--transformer", str(folder)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and cli.stderr.startswith("error:") and len(cli.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cli.mp4").exists()
    assert opened == []


@pytest.mark.slow
def test_a_whole_job_unpickles_nothing(tiny_sources, tmp_path, start_image, monkeypatch):
    calls = []

    def refuse(name):
        def refused(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")
        return refused

    for module, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    outputs = tmp_path / "out"
    # a fresh app: its models are loaded under the patch, then a job runs
    with running_app(outputs, tiny_sources) as (url, _demo):
        result = Client(url, verbose=False).predict(handle_file(str(start_image)), *form(), api_name="/generate")
    assert progress_state(result[2]) == "finished", result[2]
    assert calls == []


# ---------------------------------------------------------------------------------------------
# What is printed


@pytest.mark.slow
def test_hf_token_is_never_printed_or_logged(tiny_sources, tmp_path, start_image, monkeypatch, caplog, capfd):
    import logging

    token = "hf_" + secrets.token_hex(16)
    env = {**os.environ, "HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token, "HF_HUB_VERBOSITY": "debug",
           "TRANSFORMERS_VERBOSITY": "debug", "DIFFUSERS_VERBOSITY": "debug", "HF_HUB_OFFLINE": "1"}
    flags = ["--hunyuan", str(tiny_sources.hunyuan), "--siglip", str(tiny_sources.siglip)]
    # the command line: a job, and a hub source that is not there
    runs = [
        subprocess.run([sys.executable, "-m", "diffusers_helper", "generate", "--image", str(start_image),
                        "--prompt", "token test", "--output", str(tmp_path / "cli.mp4"), "--seconds", "1",
                        "--window", "3", "--steps", "1", "--resolution", "64", "--device", "cpu", *flags,
                        "--transformer", str(tiny_sources.transformer("framepack"))],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300),
        subprocess.run([sys.executable, "-m", "diffusers_helper", "generate", "--image", str(start_image),
                        "--prompt", "x", "--output", str(tmp_path / "hub.mp4"), "--device", "cpu", *flags,
                        "--transformer", "framepack-tests/not-here"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300),
    ]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[1].returncode == 2, runs[1].stderr
    for run in runs:
        assert token not in run.stdout + run.stderr

    # the app, in this process, with every logger at DEBUG
    for name, value in env.items():
        if name.startswith(("HF_", "HUGGING", "TRANSFORMERS", "DIFFUSERS")):
            monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    outputs = tmp_path / "app-out"
    with running_app(outputs, tiny_sources) as (url, _demo):
        c = Client(url, verbose=False)
        result = c.predict(handle_file(str(start_image)), *form(prompt="token test"), api_name="/generate")
        assert progress_state(result[2]) == "finished"
        page = httpx.get(f"{url}config").text + httpx.get(url).text
    captured = capfd.readouterr()
    assert token not in caplog.text and token not in captured.out + captured.err and token not in page
    for folder in (tmp_path, outputs):
        for path in folder.iterdir():
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path.name
