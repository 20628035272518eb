"""The convert / export-hf / verify commands and the convert script: output, exit codes, progress, signals."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers_checkpoints import GOLDEN_BIN, GOLDEN_ST
from ms_xcomposer.cli import main
from ms_xcomposer.commands.convert import sigterm_as_interrupt
from ms_xcomposer.conversion.readers import open_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r"^converted 142 tensors, 0\.02 GB in [\d.]+ s \([\d.]+ GB/s\), peak memory [\d.]+ GB -> ",
                     re.M)


def test_convert_verify_export(tmp_path, capsys):
    ms_dir, hf_dir = str(tmp_path / "ms"), str(tmp_path / "hf")
    assert main(["convert", GOLDEN_BIN, ms_dir, "--quiet"]) == 0
    out = capsys.readouterr()
    assert SUMMARY.search(out.out) and out.err == ""
    assert main(["verify", GOLDEN_BIN, ms_dir, "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("OK: 142 tensors match, 0 differ, 0 missing, 0 extra")
    assert main(["export-hf", ms_dir, hf_dir, "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("exported 142 tensors")
    assert main(["verify", GOLDEN_ST, hf_dir, "--quiet"]) == 0


def test_verify_exit_1_names_the_tensor(tmp_path, capsys):
    ms_dir = str(tmp_path / "ms")
    assert main(["convert", GOLDEN_ST, ms_dir, "--quiet"]) == 0
    key = "vision_proj.2.weight"
    with open_checkpoint(ms_dir) as r:
        info = r.info(key)
    with open(info.file, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\x00\x7f")  # element 0 becomes a NaN
    capsys.readouterr()
    assert main(["verify", GOLDEN_ST, ms_dir, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"differ: {key}: 1 of 65536 elements differ" in out and out.splitlines()[-1].startswith("MISMATCH")


def test_task_lora_drop_is_reported(tmp_path, capsys):
    assert main(["convert", GOLDEN_BIN, str(tmp_path / "ms"), "--task-lora", "drop", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "dropped 60 tensors (task adapter dropped (--task-lora drop))" in out
    assert re.search(r"^converted 82 tensors", out, re.M)


def _total_bytes(path):
    with open_checkpoint(path) as r:
        return sum(r.nbytes(k) for k in r.keys())


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["convert", GOLDEN_ST, str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    mb = f"{_total_bytes(GOLDEN_ST) / 1e6:.1f}M"  # decimal units, as the summary's GB (not MiB: 18.9M)
    assert "convert: 100%" in err and f" {mb}/{mb} " in err, err
    assert main(["convert", GOLDEN_ST, str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_script_is_the_same_command(tmp_path):
    script = os.path.join(ROOT, "convert", "convert_hf_to_mindspore.py")
    ok = subprocess.run([sys.executable, script, GOLDEN_ST, str(tmp_path / "ms"), "--format", "safetensors"],
                        capture_output=True, text=True, cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert SUMMARY.search(ok.stdout)
    # not a terminal (a log under nohup): plain progress lines at each 10 %, in GB as the summary
    lines = ok.stderr.splitlines()
    total = f"{_total_bytes(GOLDEN_ST) / 1e9:.2f}"
    assert len(lines) == 10 and "\r" not in ok.stderr, ok.stderr
    steps = [re.fullmatch(rf"convert: (\d+)% \((\d\.\d\d) of {total} GB, \d+ s\)", line) for line in lines]
    assert all(steps), lines
    assert [int(m.group(1)) // 10 for m in steps] == list(range(1, 11)) and lines[-1].startswith("convert: 100% ")
    again = subprocess.run([sys.executable, script, GOLDEN_ST, str(tmp_path / "ms")], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_sigterm_becomes_keyboard_interrupt():
    """A killed conversion unwinds like Ctrl-C, so the temporary output directory is removed."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs at the next bytecode boundary
                time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before


def test_progress_lines_also_every_30_seconds(monkeypatch, capsys):
    """A slow stretch below the next 10 % still shows the run is alive (a log under nohup)."""
    from ms_xcomposer.commands import convert as command

    clock = [100.0]
    monkeypatch.setattr(command.time, "monotonic", lambda: clock[0])
    lines = command._ProgressLines("convert")
    total = 10**10
    lines(10**8, total)  # 1 %, at once: nothing yet
    clock[0] += 29.0
    lines(10**8, total)
    assert capsys.readouterr().err == ""
    clock[0] += 1.0
    lines(10**8, total)
    assert capsys.readouterr().err == "convert: 3% (0.30 of 10.00 GB, 30 s)\n"
    lines(7 * 10**8, total)
    assert capsys.readouterr().err == "convert: 10% (1.00 of 10.00 GB, 30 s)\n"
