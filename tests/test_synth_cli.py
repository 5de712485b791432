"""The synthetic-model writer's command line, in both forms a user types it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from swapper.synth import read_shape, shape_for_size


@pytest.mark.parametrize("form", [["-m", "swapper.synth"], [str(REPO / "swapper" / "synth.py")]],
                         ids=["module", "script"])
def test_synth_command_writes_a_model_of_the_asked_size(tmp_path, form):
    out = tmp_path / "tiny.gguf"
    run = subprocess.run([sys.executable, *form, str(out), "--size", "2MiB", "--seed", "3"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    assert read_shape(out) == shape_for_size(2 << 20)


def test_synth_script_form_rejects_a_bad_size_with_a_usage_error(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "swapper" / "synth.py"), str(tmp_path / "x.gguf"),
                          "--size", "lots"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--size: expected a size such as 512MiB" in run.stderr
    assert not (tmp_path / "x.gguf").exists()
