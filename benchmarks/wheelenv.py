"""Build securefml's wheel and install it into a fresh virtualenv, offline.

Used by ``tests/test_packaging.py`` (the wheel test in ``make test``) and ``benchmarks/startup.py``.
The new virtualenv gets the wheel itself (``pip install --no-deps``) and a ``.pth`` naming the
site-packages folders of the *running* interpreter, so torch, tenseal, ... resolve without a
network.  Folders are taken from ``sys.path`` as the running interpreter sees it (a virtualenv
that chains to another through its own ``.pth`` contributes both), minus the checkout and any
editable install of securefml: the new venv must see the wheel's securefml only.  Only plain
folder lines are written, so no editable import hook from the running environment is installed.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WheelEnv", "build_wheel", "dependency_paths", "make_wheel_env"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class WheelEnv:
    """A fresh virtualenv with the built wheel installed."""

    wheel: Path
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def script(self) -> Path:
        return self.venv / "bin" / "securefml"


def _setuptools_new_enough() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "results", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def build_wheel(out_dir: Path, *, root: Path = ROOT) -> Path:
    """``pip wheel --no-deps`` of a clean copy of the checkout.

    The copy keeps setuptools' ``build/`` folder of the checkout out of it (stale files there
    would land in the wheel; two builds at once would race on it).  Without build isolation when
    the running interpreter's setuptools can build it (no index needed), with it otherwise.
    """
    source = out_dir / "source"
    shutil.copytree(root, source, ignore=_NOT_SOURCE)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out_dir), str(source)]
    if _setuptools_new_enough():
        cmd.insert(5, "--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (wheel,) = out_dir.glob("securefml-*.whl")
    return wheel


def dependency_paths(*, root: Path = ROOT) -> list[str]:
    """The running interpreter's site-packages folders, without the checkout or editable installs."""
    paths = sysconfig.get_paths()
    candidates = [*sys.path, *site.getsitepackages(), paths["purelib"], paths["platlib"]]
    out: list[str] = []
    for entry in candidates:
        path = Path(entry or ".").resolve()
        if not path.is_dir() or path == root or "__editable__" in path.name:
            continue
        if path.name not in ("site-packages", "dist-packages"):
            continue
        if str(path) not in out:
            out.append(str(path))
    return out


def make_wheel_env(work: Path, *, root: Path = ROOT) -> WheelEnv:
    """Build the wheel and install it into ``work/venv`` (which must not exist yet)."""
    wheel = build_wheel(work / "dist", root=root)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = WheelEnv(wheel, venv)
    purelib = subprocess.run(
        [str(env.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(purelib) / "_securefml_deps.pth").write_text("\n".join(dependency_paths(root=root)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env.python), "install", "-q", "--no-deps", str(wheel)],
        check=True, capture_output=True, text=True,
    )
    return env
