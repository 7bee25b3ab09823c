"""Everyday mistakes fail before the first round with one ``securefml: error:`` line (issue 12).

Each test drives the real command line (``securefml.cli.main``) or the real protocols; a
round that starts when it should not is caught by making ``Server.run_round`` fail loudly.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.cli import main, registry_names
from securefml.defenses import Mean
from securefml.errors import ConfigError, ProtocolAbort
from securefml.evaluation.report import COLUMN_AXIS, ROW_AXIS, heatmap_figure, write_reports
from securefml.protocols import CKKS, ClientUpdate, Plaintext, SecAggPlus, Transport
from securefml.registry import Registry
from securefml.server import Server
from securefml.updates import LayerLayout

TINY = ["--dataset", "sine", "--rounds", "1", "--clients-per-round", "2", "--no-progress"]


@pytest.fixture()
def no_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a round started although the configuration was invalid")

    monkeypatch.setattr(Server, "run_round", forbidden)


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("securefml: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_out_that_is_an_existing_file_fails_before_the_run(tmp_path, capsys, no_rounds) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    assert main(["run", *TINY, "--out", str(target)]) == 2
    _one_line_error(capsys, str(target), "not a folder")
    assert target.read_text() == "not a folder"


def test_out_under_a_file_fails_before_the_run(tmp_path, capsys, no_rounds) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", *TINY, "--out", str(blocker / "results")]) == 2
    _one_line_error(capsys, "cannot write results")


def test_eval_checks_out_before_the_matrix(tmp_path, capsys, no_rounds) -> None:
    target = tmp_path / "taken"
    target.write_text("")
    assert main(["eval", "--quick", "--rounds", "1", "--no-progress", "--out", str(target)]) == 2
    _one_line_error(capsys, "not a folder")


@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:7", "nonsense:0"])
def test_unusable_devices_are_one_line_errors(device, tmp_path, capsys, no_rounds) -> None:
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    assert main(["run", *TINY, "--device", device, "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, repr(device))


def test_the_cpu_device_is_accepted() -> None:
    from securefml.experiment import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")


def test_cohort_larger_than_the_dataset_fails_before_the_first_round(tmp_path, capsys, no_rounds) -> None:
    args = ["run", "--dataset", "sine", "--rounds", "1", "--clients-per-round", "100000", "--no-progress",
            "--out", str(tmp_path)]
    assert main(args) == 2
    _one_line_error(capsys, "clients_per_round=100000", "training clients")


@pytest.mark.parametrize(
    ("flag", "spec", "needles"),
    [
        ("--defense", "krum:g=1", ("'g'", "defense 'krum'", "valid options: f")),
        ("--defense", "nnm:f=1>>krum:fo=1", ("'fo'", "krum")),
        ("--protocol", "secagg:neighbors=3", ("'neighbors'", "neighbours")),
        ("--protocol", "plaintext:seed=1,x=2", ("'x'", "protocol 'plaintext'")),
    ],
)
def test_unknown_option_names_list_the_valid_ones(flag, spec, needles, tmp_path, capsys, no_rounds) -> None:
    assert main(["run", *TINY, flag, spec, "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys, *needles)
    assert "__init__" not in err and "_GeometryRule" not in err


def test_unknown_attack_option_lists_the_valid_ones(tmp_path, capsys, no_rounds) -> None:
    assert main(["run", *TINY, "--attack", "signflip:scael=3", "--malicious", "0.2", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "'scael'", "valid options: scale")


def test_registry_checks_options_against_the_signature() -> None:
    reg: Registry[object] = Registry("thing")

    class Thing:
        def __init__(self, *, alpha: float = 1.0, beta: int = 2) -> None:
            self.alpha, self.beta = alpha, beta

    reg.register("thing")(Thing)
    assert sorted(reg.options("thing") or ()) == ["alpha", "beta"]
    with pytest.raises(ConfigError) as exc:
        reg.create("thing", gamma=1, delta=2)
    for needle in ("'gamma'", "'delta'", "thing 'thing'", "valid options: alpha, beta"):
        assert needle in str(exc.value)
    assert reg.create("thing", beta=5).beta == 5  # type: ignore[attr-defined]


def test_run_help_lists_the_registry_names(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    names = registry_names()
    for kind in ("protocols", "defenses", "attacks", "datasets", "algorithms"):
        assert names[kind], kind
        for name in names[kind]:
            assert name in out, (kind, name)


# -- all-rejected rounds -------------------------------------------------------------------------
LAYOUT = LayerLayout([("a.weight", (3, 4)), ("a.bias", (3,))])


def _updates(n: int) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(0)
    return [ClientUpdate(i, 0.1 * torch.randn(LAYOUT.numel, generator=gen), LAYOUT.layer_names, 1.0)
            for i in range(n)]


class Garble(Transport):
    """An adversary on the wire: every message of every client is replaced by ``junk(sender)``."""

    def __init__(self, junk: dict[int, bytes]) -> None:
        self.junk = junk

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        return self.junk.get(sender, b"")


@settings(max_examples=20, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=3, max_size=3))
def test_plaintext_aborts_when_every_message_is_rejected(junk: list[bytes]) -> None:
    with pytest.raises(ProtocolAbort, match="none of the 3 offered updates was accepted"):
        Plaintext().run_round(0, _updates(3), LAYOUT, defense=Mean(), transport=Garble(dict(enumerate(junk))))


def test_ckks_aborts_when_every_message_is_rejected() -> None:
    protocol = CKKS()
    junk = {0: b"", 1: b"SFML" + bytes(40), 2: os.urandom(300)}
    with pytest.raises(ProtocolAbort, match="none of the 3 offered updates was accepted"):
        protocol.run_round(0, _updates(3), LAYOUT, defense=Mean(), transport=Garble(junk))


def test_secagg_aborts_when_every_message_is_rejected() -> None:
    junk = {0: b"", 1: b"SFML" + bytes(40), 2: os.urandom(300)}
    with pytest.raises(ProtocolAbort):
        SecAggPlus().run_round(0, _updates(3), LAYOUT, defense=Mean(), transport=Garble(junk))
    with pytest.raises(ProtocolAbort):
        SecAggPlus().run_round(0, [], LAYOUT, defense=Mean())


def test_a_run_records_an_aborted_round_and_carries_on(tmp_path) -> None:
    from securefml.experiment import RunConfig, run_experiment

    class DropAll(Transport):
        def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
            return b"junk"

    result = run_experiment(RunConfig(dataset="sine", rounds=2, clients_per_round=2), transport=DropAll())
    assert all("aborted" in r["extras"] and r["accepted"] == [] for r in result.history)


# -- SecAgg clipping ---------------------------------------------------------------------------
def test_secagg_reports_the_clipped_fraction_and_warns_once(caplog) -> None:
    protocol = SecAggPlus(clip_range=0.5)
    ups = _updates(3)
    for u in ups:
        u.vector.zero_()
    ups[0].vector[:5] = 2.0  # 5 of 45 entries beyond the range
    ups[1].vector[:1] = -0.75
    caplog.set_level(logging.WARNING, logger="securefml.protocols.secagg")
    fractions = []
    for rnd in range(3):
        out = protocol.run_round(rnd, ups, LAYOUT, defense=Mean())
        fractions.append(out.extras["clipped_fraction"])
    assert fractions == [pytest.approx(6 / 45)] * 3
    clip_warnings = [r for r in caplog.records if "clip_range" in r.getMessage()]
    assert len(clip_warnings) == 1


def test_secagg_under_the_range_reports_zero_and_stays_quiet(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="securefml.protocols.secagg")
    out = SecAggPlus(clip_range=10.0).run_round(0, _updates(3), LAYOUT, defense=Mean())
    assert out.extras["clipped_fraction"] == 0.0
    assert not [r for r in caplog.records if "clip_range" in r.getMessage()]


def test_bucketed_secagg_warns_once_per_run(caplog) -> None:
    protocol = SecAggPlus(buckets=2)
    caplog.set_level(logging.WARNING, logger="securefml.protocols.secagg")
    for rnd in range(3):
        protocol.run_round(rnd, _updates(6), LAYOUT, defense=Mean())
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == len(set(messages)), messages  # 3 buckets x 3 rounds would repeat each one


# -- eval output --------------------------------------------------------------------------------
def _record(attack: str, defense: str, acc: float) -> dict:
    return {"key": f"{attack}-{defense}", "attack": attack, "defense": defense, "protocol": "plaintext",
            "malicious": 0.2, "seed": 0, "metric": "accuracy", "personalized": acc, "global": acc / 3,
            "bytes_uploaded": 10, "wall_seconds": 1.0}


def test_reports_are_world_readable_like_the_plots(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        paths = write_reports([_record("none", "mean", 0.9), _record("ipm", "mean", 0.6)], tmp_path)
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(path.stat().st_mode) for name, path in paths.items()}
    assert {"json", "csv", "md", "heatmap_global"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_heatmaps_title_both_axes() -> None:
    fig = heatmap_figure([_record("none", "mean", 0.9), _record("ipm", "krum", 0.6)], "personalized")
    (ax, *_) = fig.axes
    assert ax.get_xlabel() == COLUMN_AXIS == "defense"
    assert ax.get_ylabel() == ROW_AXIS and "attack" in ROW_AXIS


def test_eval_prints_the_personalized_table_before_the_global_one(tmp_path, capsys) -> None:
    rc = main(["eval", "--quick", "--attacks", "none", "--defenses", "mean", "--rounds", "1",
               "--clients-per-round", "4", "--dataset-option", "n_clients=4", "--dataset-option", "n_heldout=2",
               "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert rc == 0
    out = capsys.readouterr().out
    pers, glob = out.find("## personalized"), out.find("## global")
    assert 0 <= pers < glob, out


# -- start-up -----------------------------------------------------------------------------------
def _loaded_after(code: str, cwd: object) -> set[str]:
    heavy = "('torch', 'opacus', 'tenseal', 'matplotlib')"
    probe = code + f"\nimport sys\nprint('LOADED:', *[m for m in {heavy} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED:")]
    return set(line.split()[1:])


def test_help_imports_no_heavy_package(tmp_path) -> None:
    code = "from securefml.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _loaded_after(code, tmp_path) == set()


def test_a_run_without_dp_or_plots_imports_neither_opacus_nor_matplotlib(tmp_path) -> None:
    code = ("from securefml.cli import main\nassert main(['run', '--dataset', 'sine', '--rounds', '1', "
            "'--clients-per-round', '2', '--no-progress', '--out', 'out']) == 0")
    loaded = _loaded_after(code, tmp_path)
    assert "torch" in loaded and not loaded & {"opacus", "matplotlib"}, loaded
