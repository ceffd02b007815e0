"""The desktop app: one Gradio page over the job queue.

- `server`: the flags of `python demo_gradio.py`, logins, what is served, launching (`main`);
- `views`: what the page shows of a job (progress bar, videos, messages);
- `ui`: the page's layout and the handlers its buttons call (`build_app`, `Page`).

Importing builds nothing and loads no model; the queue, the runtime and the output namer belong
to the objects `build_app` creates.
"""

from .server import (
    RefuseRemoteFiles,
    build_parser,
    config_from_args,
    exposure_warning,
    launch_options,
    main,
    parse_args,
    read_credentials,
    server_kwargs,
)
from .ui import CSS, FORM_FIELDS, AppConfig, Page, build_app, theme

__all__ = [
    "AppConfig", "CSS", "FORM_FIELDS", "Page", "RefuseRemoteFiles", "build_app", "build_parser", "config_from_args",
    "exposure_warning", "launch_options", "main", "parse_args", "read_credentials", "server_kwargs", "theme",
]
