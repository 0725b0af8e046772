"""Machine facts for benchmark results: CPU, flags, cores, versions, load.

Everything needed to judge whether two runs are comparable, read without side effects.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["environment", "environment_line", "machine_info", "package_version", "cpu_flags"]

# The package versions that decide benchmark numbers (distribution names).
PACKAGES = (
    "tailrank", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "hnswlib", "torch", "transformers",
    "sentence-transformers", "flashrank", "pytrec-eval-terrier", "matplotlib", "tqdm", "scipy",
)
# CPU flags that matter for matmul and distance kernels.
_FLAG_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "vnni", "bf16", "sve", "neon", "asimd")


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _wheel_tag(dist: str) -> str | None:
    """The wheel tag a package was installed from (``linux_x86_64`` means built on this machine)."""
    try:
        text = importlib.metadata.distribution(dist).read_text("WHEEL") or ""
    except importlib.metadata.PackageNotFoundError:
        return None
    tags = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]
    return ",".join(tags) or None


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD / matrix flags of the first CPU in /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].split()
                    return sorted(fl for fl in flags if fl.startswith(_FLAG_PREFIXES))
    except OSError:
        pass
    return []


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(repo_root), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def environment(repo_root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Machine, versions and load; with ``repo_root``, the git commit of the sources measured."""
    import numpy as np

    import tailrank

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    root = Path(repo_root) if repo_root is not None else None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "tailrank": getattr(tailrank, "__version__", None),
        "tailrank_file": os.path.dirname(tailrank.__file__),
        "tailrank_core_sha256": _file_sha256(tailrank._core.__file__)[:16],
        "git_commit": _git(root, "rev-parse", "--short", "HEAD") if root else None,
        "git_dirty_sources": bool(_git(root, "status", "--porcelain", "--", "csrc", "python", "CMakeLists.txt"))
        if root
        else None,
        "distance_isa": tailrank.distance_isa(),
        "numpy": np.__version__,
        "hnswlib": package_version("hnswlib"),
        "hnswlib_wheel_tag": _wheel_tag("hnswlib"),
        "tokenizers": package_version("tokenizers"),
    }


def machine_info(repo_root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """:func:`environment` plus CPU flags, the CPU quota, memory and every relevant package version."""
    from .._ort import cpu_quota

    return environment(repo_root) | {
        "cpu_flags": cpu_flags(),
        "cpu_quota": cpu_quota(),
        "memory_gib": _mem_total_gib(),
        "packages": {name: package_version(name) for name in PACKAGES},
    }


def environment_line(env: dict[str, Any]) -> str:
    """One line of the facts in ``env`` for a report."""
    git = env.get("git_commit")
    source = f"git {git}{'+dirty' if env.get('git_dirty_sources') else ''}, " if git else ""
    return (
        f"{env['cpu_model']}, {env['usable_cpus']} usable CPUs; Python {env['python']}; "
        f"tailrank {env['tailrank']} ({source}"
        f"_core {env['tailrank_core_sha256']}, distance_isa={env['distance_isa']}), hnswlib {env['hnswlib']} "
        f"(wheel {env['hnswlib_wheel_tag']}), numpy {env['numpy']}, tokenizers {env['tokenizers']}; "
        f"load average at start {env['loadavg_at_start']}; {env['date_utc']} UTC"
    )
