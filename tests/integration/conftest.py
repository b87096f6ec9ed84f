"""Fixtures for the integration tests: test models and one ComfyUI server for the session."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from comfy_server import comfy_available, ensure_test_models, make_base, start_comfyui, stop_comfyui  # noqa: E402


@pytest.fixture(scope="session")
def models():
    ok, why = comfy_available()
    if not ok:
        pytest.skip(why)
    return ensure_test_models()


@pytest.fixture(scope="session")
def server(models, tmp_path_factory):
    base = make_base(str(tmp_path_factory.mktemp("comfy_base")), models)
    log_path = os.path.join(base, "server.log")
    proc, url, info, log = start_comfyui(base, log_path)
    try:
        yield {"url": url, "info": info, "log": log_path, "base": base}
    finally:
        stop_comfyui(proc, log)
