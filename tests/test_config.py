from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    OpenAIRealtimeConfig,
    PocketSphinxConfig,
    ScriptedConfig,
    WhisperConfig,
    load_config,
)
from gateway.errors import ConfigError
from gateway.server import hypercorn_config

ROOT = Path(__file__).parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file() -> None:
    config = load_config(environ={})
    assert config.server.bind == "127.0.0.1:8000"
    assert config.server.keepalive == 15.0
    assert isinstance(config.engines["embedded"], WhisperConfig)
    assert config.engines["embedded"].model == "tiny.en"


def test_shipped_examples_load() -> None:
    config = load_config(ROOT / "config" / "gateway.toml", environ={})
    assert config.server.default_engine == "embedded"
    hc = hypercorn_config(
        load_config(
            ROOT / "config" / "gateway.toml",
            environ={"GATEWAY_SERVER_HYPERCORN_CONFIG": str(ROOT / "config" / "hypercorn.toml")},
        )
    )
    assert hc.alpn_protocols == ["h2", "http/1.1"]


def test_env_overrides_file_and_converts_types(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nkeepalive = 15\n[engines.fast]\nkind = "scripted"\n')
    config = load_config(
        path,
        environ={
            "GATEWAY_SERVER_KEEPALIVE": "2.5",
            "GATEWAY_ENGINES_FAST_WORDS": '["a", "b"]',
            "GATEWAY_ENGINES_FAST_DELAY": "0.5",
            "GATEWAY_SERVER_DEFAULT_ENGINE": "fast",
            "OTHER_VAR": "ignored",
        },
    )
    assert config.server.keepalive == 2.5
    fast = config.engines["fast"]
    assert isinstance(fast, ScriptedConfig)
    assert fast.words == ["a", "b"] and fast.delay == 0.5


def test_config_is_frozen() -> None:
    config = load_config(environ={})
    with pytest.raises(AttributeError):
        config.server.bind = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        ("[server]\nkeepalvie = 3\n", {}, "keepalvie"),
        ("[servre]\nbind = 'x'\n", {}, "servre"),
        ('[engines.e]\nkind = "scripted"\nwordz = []\n', {}, "engines.e"),
        ('[engines.e]\nkind = "nope"\n', {}, "engines.e"),
        ("", {"GATEWAY_SERVER_KEEPALIVEE": "3"}, "keepalivee"),
        ("", {"GATEWAY_NOPE_KEY": "3"}, "GATEWAY_NOPE_KEY"),
        ("", {"GATEWAY_ENGINES_GHOST_WORKERS": "3"}, "GATEWAY_ENGINES_GHOST_WORKERS"),
        ("", {"GATEWAY_SERVER_KEEPALIVE": "soon"}, "keepalive"),
        ("[server]\ndefault_engine = 'missing'\n", {}, "missing"),
        ("[server\n", {}, "invalid TOML"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(
    tmp_path: Path, text: str, env: dict[str, str], names: str
) -> None:
    with pytest.raises(ConfigError, match=names):
        load_config(write(tmp_path, text), environ=env)


def test_openai_engine_defaults() -> None:
    config = OpenAIRealtimeConfig()
    assert config.buffer_bytes == 8 * 1024 * 1024
    assert config.url.startswith("wss://api.openai.com/v1/realtime")


def test_misspelled_hypercorn_key_is_an_error(tmp_path: Path) -> None:
    hc = tmp_path / "hypercorn.toml"
    hc.write_text("keep_alive_timout = 99\n")
    config = load_config(environ={"GATEWAY_SERVER_HYPERCORN_CONFIG": str(hc)})
    with pytest.raises(ConfigError, match="keep_alive_timout"):
        hypercorn_config(config)


def test_tls_needs_both_cert_and_key() -> None:
    config = load_config(environ={"GATEWAY_SERVER_CERTFILE": "/x.pem"})
    with pytest.raises(ConfigError, match="together"):
        hypercorn_config(config)


def test_commented_engine_examples_are_valid(tmp_path: Path) -> None:
    import re

    text = (ROOT / "config" / "gateway.toml").read_text()
    # Uncomment every example table and key: the documented examples must stay loadable.
    enabled = re.sub(r"^# (\[engines\.|[a-z_]+ = )", r"\1", text, flags=re.MULTILINE)
    config = load_config(write(tmp_path, enabled), environ={})
    assert set(config.engines) == {"embedded", "sphinx", "demo", "wlk", "openai"}
    assert isinstance(config.engines["sphinx"], PocketSphinxConfig)


def test_whisper_hub_model_needs_allow_download_and_the_error_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[engines.embedded]\nkind = "whisper"\nmodel = "small"\n')
    with pytest.raises(ConfigError, match=r"engines\.embedded: .*'small'.*allow_download = true"):
        load_config(path, environ={})
    # The same name is accepted once downloads are allowed, from the file or the environment.
    config = load_config(path, environ={"GATEWAY_ENGINES_EMBEDDED_ALLOW_DOWNLOAD": "true"})
    engine = config.engines["embedded"]
    assert isinstance(engine, WhisperConfig)
    assert (engine.model, engine.allow_download) == ("small", True)


def test_whisper_model_paths_are_accepted_even_when_missing(tmp_path: Path) -> None:
    # A path is checked by the engine at start-up (unready, with the reason), not refused here.
    for model in (str(tmp_path), str(tmp_path / "missing"), "./models/small", "~/models/x"):
        path = write(tmp_path, f'[engines.embedded]\nkind = "whisper"\nmodel = "{model}"\n')
        engine = load_config(path, environ={}).engines["embedded"]
        assert isinstance(engine, WhisperConfig)
        assert engine.model == model


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("max_segment_seconds = 31.0", "max_segment_seconds"),
        ("beam_size = 0", "beam_size"),
        ("vad_threshold = 1.5", "vad_threshold"),
        ("wokers = 2", "wokers"),
    ],
)
def test_whisper_bad_values_are_refused_by_name(tmp_path: Path, line: str, match: str) -> None:
    path = write(tmp_path, f'[engines.embedded]\nkind = "whisper"\n{line}\n')
    with pytest.raises(ConfigError, match=match):
        load_config(path, environ={})
