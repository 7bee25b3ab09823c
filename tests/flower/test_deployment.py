"""The deployment recipe of docs/flower.md on loopback: a SuperLink, 3 SuperNodes, ``flwr run``, 2 rounds.

Every process is started here on free local ports, with a private ``FLWR_HOME``, and stopped by
its pid at the end.  The SuperLink's runtime dependency installation is disabled (offline: the
app's dependencies are this environment's).  A SuperNode starts one ClientApp process per
message, so on a loaded 2-core machine a round takes minutes: ``slow``.
"""

from __future__ import annotations

import pytest  # noqa: I001

pytest.importorskip("flwr", reason="Flower is the optional extra: pip install 'securefml[flower]'")

import contextlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower_app"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(path: Path, pattern: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and pattern in path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["plaintext", "secagg", "ckks"])
def test_loopback_deployment_three_supernodes_two_rounds(tmp_path: Path, protocol: str) -> None:
    """3 SuperNodes x 2 rounds; under SecAgg+ and CKKS every stage meets a fresh ClientApp process.

    Under CKKS a fourth SuperNode is the key holder (``securefml-role='key-holder'``); the keys are
    provisioned before, in a separate process, and every process finds them by
    ``$SECUREFML_CKKS_KEYS``.
    """
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.skip("flower-superlink is not installed beside this Python")
    home = tmp_path / "flwr"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    app = tmp_path / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    if protocol == "secagg":  # the SecAgg+ ClientApp, and the ServerApp told to drive SecAgg+
        toml = (app / "pyproject.toml").read_text()
        toml = toml.replace('clientapp = "securefml_app:client_app"', 'clientapp = "securefml_app:secagg_client_app"')
        toml = toml.replace('defense = "median"', 'defense = "mean"')  # SecAgg+ reveals only the sum
        (app / "pyproject.toml").write_text(toml.replace('protocol = "plaintext"', 'protocol = "secagg"'))
    if protocol == "ckks":
        from securefml.flower.provision import provision_in_subprocess

        provision_in_subprocess(tmp_path / "keys", range(3), preset="add-only", min_contributors=2)
        env["SECUREFML_CKKS_KEYS"] = str(tmp_path / "keys")
        toml = (app / "pyproject.toml").read_text()
        toml = toml.replace('clientapp = "securefml_app:client_app"', 'clientapp = "securefml_app:ckks_client_app"')
        toml = toml.replace('defense = "median"', 'defense = "mean"')
        (app / "pyproject.toml").write_text(toml.replace('protocol = "plaintext"', 'protocol = "ckks"'))
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> Path:
        log = tmp_path / f"{name}.log"
        procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                      env=env, cwd=tmp_path, start_new_session=True))
        return log

    try:
        link = start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                     "--port", str(port))
        if not _wait_for(link, "Uvicorn running", 120):
            pytest.skip(f"the SuperLink did not start offline: {link.read_text(errors='replace')[-500:]}")
        nodes = [start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                       "--port", str(_free_port()), "--node-config", f"partition-id={i}") for i in range(3)]
        if protocol == "ckks":
            nodes.append(start("keyholder", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                               "--port", str(_free_port()), "--node-config", "securefml-role='key-holder'"))
        for log in nodes:
            assert _wait_for(log, "SuperNode ID", 120), log.read_text(errors="replace")[-500:]
        run = subprocess.run([str(BIN / "flwr"), "run", ".", "loopback", "--stream"], cwd=app, env=env,
                             capture_output=True, timeout=1500)
        out = run.stdout.decode(errors="replace") + run.stderr.decode(errors="replace")
        rounds = re.findall(r"Aggregated MetricRecord: \{'accepted': (\d+)", out)
        assert rounds == ["3", "3"], out[-3000:]
        if protocol == "secagg":
            assert out.count("'advertise', 'share', 'complaints', 'masked', 'unmask'") == 2, out[-3000:]
        if protocol == "ckks":
            assert out.count("stages ['announce', 'update', 'decrypt']") == 2, out[-3000:]
    finally:
        for p in procs:  # each started here, in its own session: stop its group (its ClientApp children)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
