"""The package a user installs: the built wheel, in a fresh virtualenv, outside the checkout.

The editable install hides packaging mistakes (a subpackage left out of the wheel still imports
from the checkout), so this builds the wheel, installs it with ``--no-deps`` into a new venv
whose ``.pth`` reuses the running interpreter's dependencies (no network), and runs the entry
points from a directory outside the checkout.  Subpackages are discovered from the source tree,
never listed by hand, so a new one (``securefml/bayes/``, ...) is checked the day it appears.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("wheelenv", ROOT / "benchmarks" / "wheelenv.py")
assert _spec is not None and _spec.loader is not None
wheelenv = importlib.util.module_from_spec(_spec)
sys.modules["wheelenv"] = wheelenv
_spec.loader.exec_module(wheelenv)

#: checkout folder -> import name, as setup.py maps them
FOLDERS = {"securefml": "securefml", "protocols": "securefml.protocols", "defenses": "securefml.defenses",
           "attacks": "securefml.attacks"}


def source_packages() -> set[str]:
    """Every package in the checkout (a folder with ``__init__.py``), by its installed name."""
    names = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            names.add(".".join([name, *rel.parts]) if rel.parts else name)
    return names


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> wheelenv.WheelEnv:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return wheelenv.make_wheel_env(tmp_path_factory.mktemp("wheel"))
    # under xdist the workers share one session folder: the first builds, the others wait and reuse
    shared = tmp_path_factory.getbasetemp().parent
    with open(shared / "wheel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        work = shared / "wheel"
        if not (work / "ready").exists():
            wheelenv.make_wheel_env(work)
            (work / "ready").touch()
    return wheelenv.WheelEnv(next((work / "dist").glob("securefml-*.whl")), work / "venv")


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    assert ROOT not in tmp_path.resolve().parents
    return tmp_path


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=clean)


def test_the_wheel_carries_every_package_of_the_tree(env: wheelenv.WheelEnv) -> None:
    with zipfile.ZipFile(env.wheel) as whl:
        files = whl.namelist()
    in_wheel = {name.rsplit("/", 1)[0].replace("/", ".") for name in files if name.endswith("/__init__.py")}
    assert "securefml.privacy" in source_packages()  # the package the hand list once left out
    assert source_packages() <= in_wheel, sorted(source_packages() - in_wheel)
    assert "securefml/py.typed" in files
    assert not [n for n in files if n.startswith(("tests/", "benchmarks/", "protocols/", "defenses/", "attacks/"))]


def test_every_public_subpackage_imports_from_the_wheel(env: wheelenv.WheelEnv, outside: Path) -> None:
    public = sorted(n for n in source_packages() if not any(part.startswith("_") for part in n.split(".")))
    code = (
        "import importlib, json, sys\n"
        f"names = {public!r}\n"
        "files = {n: importlib.import_module(n).__file__ for n in names}\n"
        "print(json.dumps(files))\n"
    )
    proc = _run([str(env.python), "-c", code], outside)
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout)
    assert set(files) == set(public)
    for name, path in files.items():  # each one from the installed wheel, not the checkout
        assert Path(path).resolve().is_relative_to(env.venv.resolve()), (name, path)


def test_help_from_the_script_and_python_m(env: wheelenv.WheelEnv, outside: Path) -> None:
    for cmd in ([str(env.script), "--help"], [str(env.python), "-m", "securefml", "--help"]):
        proc = _run(cmd, outside)
        assert proc.returncode == 0, proc.stderr
        assert "usage: securefml" in proc.stdout and "run" in proc.stdout and "eval" in proc.stdout


def test_a_two_round_run_from_the_wheel(env: wheelenv.WheelEnv, outside: Path) -> None:
    cmd = [str(env.script), "run", "--dataset", "sine", "--algorithm", "fomaml", "--rounds", "2",
           "--clients-per-round", "3", "--no-progress", "--out", "out"]
    proc = _run(cmd, outside, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((outside / "out" / "result.json").read_text())
    assert result["metrics"]["rounds"] == 2 and len(result["history"]) == 2


def test_testing_without_hypothesis_says_how_to_install_it(env: wheelenv.WheelEnv, outside: Path) -> None:
    code = "import sys\nsys.modules['hypothesis'] = None\nimport securefml.testing\n"
    proc = _run([str(env.python), "-c", code], outside)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "pip install 'securefml[testing]'" in proc.stderr


def test_type_checkers_can_follow_the_installed_layout(outside: Path) -> None:
    """The development install must be a plain folder tree (strict editable mode), not an import
    hook: there ``securefml.protocols`` lives inside the installed ``securefml`` folder, which is
    what mypy and IDEs resolve (with the hook, mypy saw none of protocols/defenses/attacks)."""
    code = (
        "import importlib.util, pathlib\n"
        "for name in ('securefml.protocols', 'securefml.defenses', 'securefml.attacks'):\n"
        "    origin = pathlib.Path(importlib.util.find_spec(name).origin)\n"
        "    print(origin.parent.parent.name, origin.parent.parent.joinpath('__init__.py').is_file())\n"
    )
    proc = _run([sys.executable, "-c", code], outside)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["securefml", "True"] * 3, proc.stdout


def test_mypy_has_no_blanket_missing_import_ignore() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert "ignore_missing_imports" not in config
    exempt = {m for o in config.get("overrides", []) if o.get("ignore_missing_imports") for m in o["module"]}
    assert not {m for m in exempt if m.startswith("securefml")}
