"""pytest plugin loaded into llama.cpp's own server test suite (`-p swapper_adapter`) so that its
router tests drive `swapper serve` instead of `llama-server`.

Their harness (`utils.py`) starts `$LLAMA_SERVER_BIN_PATH` with llama-server's router flags and
waits on `GET /health`; that path is a wrapper that runs `swapper serve` with the same words. The
models the tests name come from a Hugging Face cache written locally beforehand (`$LLAMA_CACHE`),
so the harness's model downloads (`ServerPreset.load_all`) are not run, and the two tests that
need the Hub itself are skipped, saying so.
"""

from __future__ import annotations

import pytest

NEEDS_NETWORK = {
    "test_router_remote_preset": "needs the Hugging Face Hub (network): fetches the remote preset repo "
                                 "ggml-org/test-preset-ci",
    "test_router_download_model": "needs the Hugging Face Hub (network): downloads "
                                  "ggml-org/test-model-router-download",
}


def pytest_configure(config: pytest.Config) -> None:
    import utils  # theirs, from the suite's folder

    # models are already in the local cache; nothing to download
    utils.ServerPreset.load_all = staticmethod(lambda: None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = NEEDS_NETWORK.get(item.originalname if hasattr(item, "originalname") else item.name)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
