"""Where a number came from: the machine and the commit, recorded beside every measurement we publish."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, cores, torch threads, torch and Python versions."""
    import torch

    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, Python {platform.python_version()}"
    )


def git_commit(where: str | os.PathLike = ".") -> str:
    """The commit checked out at ``where`` (+ a note when the tree has uncommitted changes), or "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True).stdout
        return commit.stdout.strip() + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
