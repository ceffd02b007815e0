"""Uploads whatever their names, and the page's message when Gradio refuses a file.

Gradio refuses, before any handler runs, a file whose name starts with a dot when it lies in the
working directory; the launcher keeps Gradio's upload folder inside the app folder, which is also
the app's working directory. These tests put the upload folder inside the working directory the
same way, so they check under plain pytest what the launcher's test run sees.
"""

from __future__ import annotations

import json
import shutil

import pytest

from appkit import call_raw, form, progress_state, running_app, save_noise_image

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is needed to drive the app")
from gradio_client import Client, handle_file  # noqa: E402

# the app over HTTP: run with the full suite, not the quick one
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app_in_its_folder(tiny_sources, tmp_path_factory):
    """The app with the launcher's layout: working directory = app folder, uploads in <app>/temp/gradio."""
    folder = tmp_path_factory.mktemp("app-folder")
    image = tmp_path_factory.mktemp("images") / "start.png"
    save_noise_image(image, seed=5, size=(64, 64))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("GRADIO_TEMP_DIR", str(folder / "temp" / "gradio"))
        with running_app(folder / "outputs", tiny_sources) as (url, _demo):
            yield url, folder, image


@pytest.mark.parametrize("name", [".hidden start.png", "..%2F..%2Fevil name.png", "...png"])
def test_an_upload_whose_name_starts_with_a_dot_is_used(app_in_its_folder, tmp_path, name):
    url, folder, image = app_in_its_folder
    upload = tmp_path / name
    shutil.copy(image, upload)
    result = Client(url, verbose=False).predict(handle_file(str(upload)), *form(), api_name="/generate")
    assert progress_state(result[2]) == "finished"
    # the upload stays inside the upload folder, under its own name and the one Gradio was given
    stored = [p for p in (folder / "temp" / "gradio").rglob("*") if p.is_file() and p.name.endswith(name.lstrip("."))]
    assert {p.name for p in stored} >= {name, name.lstrip(".") or "upload"}, stored


def test_a_file_gradio_refuses_is_named_in_our_message(app_in_its_folder):
    url, folder, image = app_in_its_folder
    # Files that were not uploaded: one beside the app (its working directory), a hidden one there, one elsewhere.
    (folder / ".env").write_text("SECRET=1")
    (folder / "notes.png").write_bytes(image.read_bytes())
    for path in (folder / ".env", folder / "notes.png", image):
        payload = {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
        event, data = call_raw(url, "generate", json.dumps({"data": [payload, *form()]}))
        assert event == "error", (path, data)
        assert data.get("title") == "Upload refused", (path, data)
        assert path.name in data["error"] and "Upload it again" in data["error"], (path, data)
        assert "SECRET" not in json.dumps(data)

