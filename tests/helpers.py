"""Helpers shared by the tests that run the CLI in a subprocess (offline, through ``python -m``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def run_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run ``equalbits ARGS`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "equalbits_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=cli_env(**(env or {})),
    )


def start_cli(*args, **popen_kwargs) -> subprocess.Popen:
    """Start ``equalbits ARGS`` in the background."""
    return subprocess.Popen([sys.executable, "-m", "equalbits_cli", *map(str, args)], env=cli_env(), **popen_kwargs)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Wait until ``path`` exists (or ``proc`` ends, or ``timeout`` passes); True if it exists."""
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return path.exists()


def invoke_cli(*args) -> subprocess.CompletedProcess:
    """Run ``equalbits ARGS`` in this process (typer's CliRunner: no interpreter start-up, no second import
    of torch), with the shape of :func:`run_cli`'s result. For tests that need no process of their own."""
    from typer.testing import CliRunner

    from equalbits_cli.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)
