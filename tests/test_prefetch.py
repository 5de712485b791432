"""The page-cache warm tier, observed in the real page cache (mincore and util-linux's fincore).

Nothing is mocked: files are dropped from the cache with POSIX_FADV_DONTNEED and their residency
is read back from the kernel. Each test works on its own copy of a model file, so no other
process holds its pages mapped (mapped pages cannot be dropped).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import synth_file
from fake_vllm import hf_folder
from swapper.catalog import ModelEntry
from swapper.prefetch import Prefetcher, dontneed, resident_bytes, resident_fraction

MiB = 1 << 20


def private_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped
    return dst


def cold(path: Path) -> Path:
    dontneed(path)
    assert resident_bytes(path) < path.stat().st_size * 0.05, "the file could not be dropped from the cache"
    return path


def entry(name: str, *files: Path) -> ModelEntry:
    return ModelEntry(id=name, name=name, engine="llamacpp", path=files[0], source="config",
                      size=sum(f.stat().st_size for f in files), files=tuple(files))


def fincore_bytes(path: Path) -> int:
    out = subprocess.run(["/usr/bin/fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def wait_until(pred, timeout: float = 10.0) -> bool:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return private_copy(synth_file(8, 3), tmp_path / "m" / "model.gguf")


def test_resident_bytes_agrees_with_fincore(model_file):
    cold(model_file)
    assert abs(fincore_bytes(model_file) - resident_bytes(model_file)) <= 4096
    assert resident_bytes(model_file) < 512 * 1024
    with open(model_file, "rb") as f:
        f.read(4 * MiB)
    assert wait_until(lambda: resident_bytes(model_file) >= 4 * MiB)
    readings = [-2, -1]
    assert wait_until(lambda: readings.append(resident_bytes(model_file)) or readings[-1] == readings[-2]), \
        "the kernel's readahead settles"
    now = readings[-1]
    assert abs(fincore_bytes(model_file) - now) <= 4096


def test_prefetch_reads_a_cold_model_into_the_page_cache(model_file, tmp_path):
    mmproj = private_copy(model_file, tmp_path / "m" / "mmproj-model.gguf")
    cold(model_file), cold(mmproj)
    pf = Prefetcher(warm_budget=1 << 30)
    try:
        assert pf.prefetch(entry("m", model_file, mmproj))
        assert wait_until(lambda: resident_fraction([model_file, mmproj]) == 1.0)
        assert fincore_bytes(model_file) >= model_file.stat().st_size, "fincore sees it too (whole pages)"
        assert not pf.prefetch(entry("m", model_file, mmproj)), "a repeat right after is a no-op"
    finally:
        pf.close()


def test_recently_evicted_models_are_kept_warm_within_the_allowance(tmp_path):
    files = {n: private_copy(synth_file(8, 3), tmp_path / n / "model.gguf") for n in ("old", "new", "big")}
    size = files["old"].stat().st_size
    pf = Prefetcher(warm_budget=2 * size + MiB, refresh=0.1, spare=0)
    try:
        pf.evicted(entry("old", files["old"]))
        pf.evicted(entry("new", files["new"]))
        for f in files.values():
            dontneed(f)  # (the keeper may already be reading them back: no residency check here)
        assert wait_until(lambda: resident_fraction([files["old"], files["new"]]) == 1.0 and pf.bytes_read >= size), \
            "dropped pages of evicted models are read back"
        pf.evicted(entry("big", files["big"]))  # three no longer fit: the oldest is let go
        assert list(pf.warm) == ["new", "big"]
        done = pf.passes
        assert wait_until(lambda: pf.passes >= done + 2), "a whole pass ran without the old model"
        cold(files["old"])
        dontneed(files["big"])
        assert wait_until(lambda: resident_fraction([files["big"]]) == 1.0)
        done = pf.passes
        assert wait_until(lambda: pf.passes >= done + 2), "two more whole passes ran"
        assert resident_bytes(files["old"]) < size * 0.05, "a model past the allowance is not kept warm"
        status = pf.status()
        assert [w["model"] for w in status["warm"]] == ["big", "new"]
        assert all(w["resident_bytes"] == w["bytes"] for w in status["warm"])
        pf.forget(entry("new", files["new"]))
        assert list(pf.warm) == ["big"], "a model that starts again is no longer merely warm"
    finally:
        pf.close()


def test_incoming_model_becomes_resident_while_the_victim_drains(swapper_factory, tmp_path, openai_client):
    """A swap whose victim is busy: the incoming GGUF is read in while the victim's stream runs."""
    gguf = private_copy(synth_file(32, 12), tmp_path / "gguf" / "incoming.gguf")
    cfg = {
        "engines": {"vllm": {"command": [sys.executable, str(Path(__file__).with_name("fake_vllm.py"))]}},
        "models": {"victim": {"path": str(hf_folder(tmp_path / "hf", "victim")), "engine": "vllm"},
                   "incoming": {"path": str(gguf)}},
    }
    s = swapper_factory("--max-models", "1", "--max-wait", "0", config=cfg,
                        env={"FAKE_VLLM_TOKEN_SECONDS": "0.05", "FAKE_VLLM_START_SECONDS": "0.2"})
    client = openai_client(s)
    chunks: list[float] = []
    first = threading.Event()

    def stream() -> None:
        for c in client.chat.completions.create(model="victim", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=240, stream=True):  # 12 s of stream
            if c.choices and c.choices[0].delta.content:
                chunks.append(time.monotonic())
                first.set()

    victim = threading.Thread(target=stream)
    victim.start()
    assert first.wait(60), "the victim never streamed"
    cold(gguf)
    answer: list[str] = []
    incoming = threading.Thread(target=lambda: answer.append(client.completions.create(
        model="incoming", prompt="a", max_tokens=4).choices[0].text))
    incoming.start()
    # well inside the victim's stream, with room for a slow disk on a busy machine
    assert wait_until(lambda: resident_fraction([gguf]) == 1.0, 8.0), "the incoming model was not prefetched"
    warm_at = time.monotonic()
    assert victim.is_alive() and s.status("victim")["state"] == "draining", "resident before the drain ended"
    assert s.status("incoming")["value"] != "loaded"
    victim.join(60)
    incoming.join(120)
    assert answer, "the incoming model answered after the swap"
    assert chunks[-1] > warm_at, "the victim's stream was still running when the file became resident"
    assert len(chunks) == 240, "the victim's stream was drained, not cut"
    assert s.status("incoming")["value"] == "loaded" and s.status("victim")["value"] == "unloaded"
