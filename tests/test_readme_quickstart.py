"""README's quick-start commands, as written there, against a served demo folder, each within seconds.

The commands are read from README.md (the shell block after "from another shell"), so the
manual cannot drift from what works. The folder is what `make models` builds: the real Gemma 3
270M GGUF and two synthetic models.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from conftest import REPO, link, synth_file

pytestmark = pytest.mark.real

BOUND_S = 30.0  # each command, cold start of its model included (a few seconds here, on 2 busy cores)


def quickstart_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index("from another shell:")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block, "README's quick start has no shell block"
    commands, current = [], ""
    for line in block.group(1).splitlines():
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if current.strip():
                commands.append(current.strip())
            current = ""
    return commands


def test_readme_has_quickstart_commands_for_the_demo_models():
    cmds = quickstart_commands()
    assert len(cmds) >= 2 and all("localhost:8080" in c for c in cmds)
    assert any('"gemma-3-270m"' in c for c in cmds)


def test_readme_quickstart_answers_within_seconds(swapper_factory, tmp_path, gemma_file):
    d = tmp_path / "models"
    link(gemma_file, d / "gemma-3-270m.gguf")
    link(synth_file(16, 1), d / "tiny-a.gguf")
    link(synth_file(32, 2), d / "tiny-b.gguf")
    s = swapper_factory("--models-dir", str(d))
    for cmd in quickstart_commands():
        run = cmd.replace("localhost:8080", f"127.0.0.1:{s.port}")
        t0 = time.monotonic()
        r = subprocess.run(["bash", "-c", "set -o pipefail; " + run], capture_output=True, text=True,
                           timeout=BOUND_S * 4)
        took = time.monotonic() - t0
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"
        assert took < BOUND_S, f"{cmd} took {took:.1f} s"
        doc = json.loads(r.stdout)
        assert "error" not in doc, doc
        if "/v1/models" in cmd:
            assert {m["id"] for m in doc["data"]} == {"gemma-3-270m", "tiny-a", "tiny-b"}
        elif '"gemma-3-270m"' in cmd:
            text = doc["choices"][0]["message"]["content"]
            assert text and "<|im_" not in text, "Gemma is prompted in its own format, not ChatML"
        else:
            assert doc["choices"][0]["message"]["content"] is not None
