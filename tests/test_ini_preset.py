"""llama.cpp router INI presets, read by common/preset.cpp's rules, quirks included, and applied
to the catalog the way the router merges cache, models-dir and preset models."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamacpp_router.hub_cache import write_repo
from swapper.catalog import build_catalog
from swapper.config import ModelSpec, Settings
from swapper.hfcache import gguf_tag, scan_hf_cache
from swapper.ini_preset import PresetError, load_presets, parse_ini


def test_sections_keys_comments_and_defaults():
    glob, presets = load_presets(
        "version = 1\n"
        "; a comment\n"
        "# another\n"
        "[*]\n"
        "c = 8192          ; short flag names work, trailing comment dropped\n"
        "[coder]\n"
        "hf-repo = org/coder-GGUF:Q4_K_M\n"
        "LLAMA_ARG_N_GPU_LAYERS = 20\n"
        "no-context-shift = true\n"
        "temp=0.5#no space before the comment\n")
    assert glob.to_args() == ["--ctx-size", "8192"]
    assert set(presets) == {"coder"}, "a 'default' section holding only 'version' is no model"
    p = presets["coder"]
    assert p.get("LLAMA_ARG_HF_REPO") == "org/coder-GGUF:Q4_K_M"
    assert p.get("LLAMA_ARG_N_GPU_LAYERS") == "20", "keys may be LLAMA_ARG_* names"
    assert p.get("LLAMA_ARG_CONTEXT_SHIFT") == "false", "a negated switch is stored as its positive, reversed"
    assert p.get("LLAMA_ARG_TEMPERATURE") == "0.5", "a value ends at ; or # even without a blank"
    assert "--no-context-shift" in p.to_args() and "--temperature" in p.to_args()


def test_keys_before_any_section_make_a_model_named_default():
    _, presets = load_presets("model = /m/x.gguf\n[other]\nmodel = /m/y.gguf\n")
    assert set(presets) == {"default", "other"}


def test_a_repeated_section_starts_afresh():
    _, presets = load_presets("[m]\nmodel = /a.gguf\ntemp = 1\n[m]\nmodel = /b.gguf\n")
    assert presets["m"].get("LLAMA_ARG_MODEL") == "/b.gguf"
    assert presets["m"].get("LLAMA_ARG_TEMPERATURE") is None, "the first [m]'s keys are gone, as in preset.cpp"


def test_section_tags_are_canonicalised():
    _, presets = load_presets("[org/a-GGUF:q4_k_m]\nmodel = /a\n[org/b-GGUF:model-q8_0]\nmodel = /b\n")
    assert set(presets) == {"org/a-GGUF:Q4_K_M", "org/b-GGUF:Q8_0"}


@pytest.mark.parametrize("text,said", [
    ("[m]\n  model = /a.gguf\n", "line 2"),  # indented keys are not keys
    ("[m]\nno equals sign\n", "line 2"),
    ("[m]\nnot-a-flag = 1\n", "option 'not-a-flag' not recognized in preset 'm'"),
])
def test_bad_lines_and_unknown_keys_fail_the_file(text, said):
    with pytest.raises(PresetError, match=said):
        load_presets(text)


def test_to_ini_writes_long_keys_in_llama_cpp_order():
    _, presets = load_presets("[m]\nn-gpu-layers = 1\nc = 512\nmodel = /x.gguf\n")
    assert presets["m"].to_ini() == "[m]\nctx-size = 512\nmodel = /x.gguf\nn-gpu-layers = 1\n\n"


def test_preset_only_keys_are_not_child_flags():
    _, presets = load_presets("[m]\nmodel = /x\nload-on-startup = true\nstop-timeout = 5\ndedup-cache-models = 1\n")
    assert presets["m"].to_args() == ["--model", "/x"]
    assert parse_ini("[a]\nk = v ; c\n") == {"a": {"k": "v"}}


# ---------------------------------------------------------------------- cache names


@pytest.mark.parametrize("path,tag", [
    ("tinygemma3-Q8_0.gguf", "Q8_0"), ("stories260K-f32.gguf", "F32"), ("sub/model.q4_k_m.gguf", "Q4_K_M"),
    ("model-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"), ("model.gguf", ""), ("mmproj-model-f16.gguf", ""),
    ("mtp-model-Q8_0.gguf", ""),
])
def test_gguf_tags_follow_llama_cpp(path, tag):
    assert gguf_tag(path)[0] == tag


def _gguf(tmp_path: Path, name: str) -> Path:
    p = tmp_path / "src" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"GGUF" + name.encode())
    return p


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    c = tmp_path / "hub"
    write_repo(c, "org/one-GGUF", {"one-Q8_0.gguf": _gguf(tmp_path, "one-Q8_0.gguf")})
    write_repo(c, "org/draft-GGUF", {"draft-F16.gguf": _gguf(tmp_path, "draft-F16.gguf")})
    write_repo(c, "org/notag-GGUF", {"model.gguf": _gguf(tmp_path, "model.gguf")})
    return c


def test_cache_names_always_carry_the_tag_and_llama_cache_is_read(cache, monkeypatch):
    monkeypatch.setenv("LLAMA_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent")
    cat = build_catalog(Settings(), scan_hf_cache())
    assert sorted(cat.names()) == ["org/draft-GGUF:F16", "org/one-GGUF:Q8_0"], "a file without a tag is not listed"
    assert cat.resolve("org/one-GGUF").entry.id == "org/one-GGUF:Q8_0", "swapper's earlier name is an alias"
    assert cat.get("org/one-GGUF:Q8_0").source == "cache"


def test_presets_merge_with_cache_models_and_dedup_hides_them(cache, tmp_path):
    text = ("[*]\nctx-size = 2048\n"
            "[mine]\nhf-repo = org/one-GGUF\nspec-draft-hf = org/draft-GGUF\ndedup-cache-models = 1\n"
            "alias = m1, m2\nload-on-startup = true\ntemp = 0.2\n"
            "[org/draft-GGUF:f16]\nparallel = 2\n"
            "[ghost]\nhf-repo = org/missing-GGUF\n")
    cat = build_catalog(Settings(), scan_hf_cache(cache), load_presets(text))
    mine = cat.get("mine")
    assert mine is not None and mine.source == "preset" and mine.startup
    assert mine.path.name == "one-Q8_0.gguf" and mine.draft is not None and mine.draft.name == "draft-F16.gguf"
    assert mine.aliases == ("m1", "m2") and mine.ctx_size == 2048
    assert list(mine.args)[-2:] == ["--temperature", "0.2"]
    assert "[mine]\n" in mine.preset_ini and "hf-repo = org/one-GGUF\n" in mine.preset_ini
    assert cat.get("org/one-GGUF:Q8_0").hidden, "dedup-cache-models hides the cache entry behind the preset"
    draft = cat.get("org/draft-GGUF:F16")
    assert draft.source == "preset" and draft.parallel == 2 and draft.ctx_size == 1024, \
        "a section named like a cache model adds to it; [*] applies under it (-c is the total)"
    assert not draft.hidden, "dedup hides pure cache entries only (llama.cpp: a merged one is a preset)"
    assert cat.get("ghost") is None, "a preset whose repo is not cached is skipped (offline)"


def test_yaml_models_win_over_preset_sections(cache):
    st = Settings()
    st.models["mine"] = ModelSpec(name="mine", path="/elsewhere.gguf")
    cat = build_catalog(st, scan_hf_cache(cache), load_presets("[mine]\nhf-repo = org/one-GGUF\n"))
    assert cat.get("mine").source == "config" and str(cat.get("mine").path) == "/elsewhere.gguf"
