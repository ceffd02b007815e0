"""Run a measurement in a fresh Python process, so that its memory figures are its own.

The child is started with multiprocessing's "spawn" method: a new interpreter that gets the
parent's sys.path and working folder, so it imports this package wherever the parent found it
(no PYTHONPATH, no reliance on the current folder). The child's stdout goes to the null device:
the parent's stdout carries only the JSON document it prints. The child's stderr is the parent's.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

EXIT_FAILED = 1


def run_fresh(function: Callable[..., Any], *args: Any) -> tuple[int, Optional[dict]]:
    """Call `function(*args)` in a fresh process; returns (exit status, the dict it returned).

    `function` (a module-level function; its arguments must pickle) returns a JSON-able dict, or
    an exit status when it could not measure (2: an input error, 1: a failure), having said why on
    stderr. The dict is None unless the status is 0.
    """
    with tempfile.TemporaryDirectory(prefix="framepack-bench-result-") as folder:
        result = Path(folder) / "result.json"
        process = multiprocessing.get_context("spawn").Process(
            target=_child, args=(function, args, str(result)), name="framepack-bench")
        process.start()
        process.join()
        code = process.exitcode
        data = json.loads(result.read_text(encoding="utf-8")) if code == 0 and result.is_file() else None
        if isinstance(data, dict):
            return 0, data
        # a child killed by a signal has a negative status; a child that returned no figures failed
        return (code if code and code > 0 else EXIT_FAILED), None


def _child(function: Callable[..., Any], args: tuple, result: str) -> None:
    """The child's body: quiet stdout, run, write the result file (or exit with the status)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    os.dup2(devnull, 1)
    os.close(devnull)
    outcome = function(*args)
    if isinstance(outcome, int):
        sys.exit(outcome)
    tmp = Path(result).with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome), encoding="utf-8")
    os.replace(tmp, result)
