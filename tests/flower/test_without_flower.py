"""Without Flower installed, ``securefml.flower`` still imports and says which extra to install.

Runs in a subprocess that hides ``flwr`` (a meta-path finder raising ``ModuleNotFoundError``), so
it checks the no-extra path whether or not Flower is installed here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HIDE_FLWR = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "flwr" or name.startswith("flwr."):
            raise ModuleNotFoundError("No module named 'flwr'", name="flwr")
sys.meta_path.insert(0, Hide())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", HIDE_FLWR + code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_the_package_imports_and_names_the_extra_on_use() -> None:
    proc = _run("import securefml.flower as f\ntry:\n    f.SecureStrategy\nexcept ImportError as e:\n    print(e)\n")
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'securefml[flower]'" in proc.stdout


def test_engine_flower_on_the_command_line_is_a_config_error(tmp_path: Path) -> None:
    proc = _run("from securefml.cli import main\n"
                f"sys.exit(main(['run', '--engine', 'flower', '--rounds', '1', '--out', {str(tmp_path)!r}, "
                "'--no-progress']))\n")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "securefml[flower]" in proc.stderr and "Traceback" not in proc.stderr
