"""One embedded server with the default LLM for the whole session."""

import pytest

import uhlm


@pytest.fixture(scope="session")
def models():
    return uhlm.ensure_default_models()


@pytest.fixture(scope="session")
def server(models):
    server = uhlm.EmbeddedServer.start(models.llm_path, None)
    yield server
    server.stop()


@pytest.fixture
def make_config(models, server):
    def make(mode, api_key=None):
        return uhlm.EngineConfig(
            slm_path=models.slm_path,
            server=server.address(),
            pin=server.cert_fingerprint(),
            api_key=server.api_key() if api_key is None else api_key,
            mode=mode,
        )

    return make
