"""Server settings precedence (defaults < YAML < env < CLI) and the `subspec serve` flags."""

from __future__ import annotations

import argparse

import pytest

from server.engine_args import engine_config_from_args
from server.serve import add_serve_arguments
from server.settings import MIB, ServerSettings, default_body_limit, resolve_server_settings, settings_overrides


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_defaults():
    settings = resolve_server_settings()
    assert settings == ServerSettings()
    got = (settings.host, settings.port, settings.api_key, settings.request_timeout_s)
    assert got == ("127.0.0.1", 8000, None, None)


def test_precedence_yaml_env_cli():
    yaml_section = {"port": 9000, "max_queue": 3, "api_key": "from-yaml", "request_timeout_s": 30}
    environ = {"SUBSPEC_SERVER_MAX_QUEUE": "5", "SUBSPEC_SERVER_API_KEY": "12345", "SUBSPEC_SERVER_HOST": "0.0.0.0"}
    args = parse("--max-queue", "7", "--request-timeout", "2.5")
    settings = resolve_server_settings(yaml_section=yaml_section, environ=environ,
                                       cli_overrides=settings_overrides(args))
    assert settings.port == 9000  # yaml
    assert settings.host == "0.0.0.0" and settings.api_key == "12345"  # env (a numeric key stays a string)
    assert settings.max_queue == 7 and settings.request_timeout_s == 2.5  # cli


def test_env_none_words_unset_optional_settings():
    settings = resolve_server_settings(yaml_section={"request_timeout_s": 5},
                                       environ={"SUBSPEC_SERVER_REQUEST_TIMEOUT_S": "none"})
    assert settings.request_timeout_s is None


@pytest.mark.parametrize("yaml_section, environ, match", [
    ({"prot": 1}, {}, "unknown key"),
    ({"port": 70000}, {}, "port"),
    ({}, {"SUBSPEC_SERVER_MAX_QUEUE": "many"}, "max_queue must be int"),
    ({"max_queue": -1}, {}, "max_queue"),
    ({"request_timeout_s": 0}, {}, "request_timeout_s"),
    ({"log_level": "loud"}, {}, "log_level"),
    ({"heartbeat_timeout_s": 0}, {}, "heartbeat_timeout_s"),
    ({"max_body_bytes": 10}, {}, "max_body_bytes"),
    ({"read_timeout_s": -1}, {}, "read_timeout_s"),
    ({"shutdown_timeout_s": -1}, {}, "shutdown_timeout_s"),
])
def test_invalid_settings(yaml_section, environ, match):
    with pytest.raises(ValueError, match=match):
        resolve_server_settings(yaml_section=yaml_section, environ=environ)


def test_serve_flags_reach_both_configs(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: default\nmax_model_len: 1024\nspeculation: {topk: 3}\nserver: {port: 9100}\n")
    args = parse("--config", str(preset), "--max-depth", "5", "--mode", "vanilla", "--api-key", "k", "--port", "9200")
    config = engine_config_from_args(args, environ={"SUBSPEC_MAX_MODEL_LEN": "768"})
    got = (config.mode, config.max_model_len, config.speculation.topk, config.speculation.max_depth)
    assert got == ("vanilla", 768, 3, 5)
    settings = resolve_server_settings(yaml_section={"port": 9100}, environ={}, cli_overrides=settings_overrides(args))
    assert settings.port == 9200 and settings.api_key == "k"


def test_empty_values_mean_unset():
    settings = resolve_server_settings(yaml_section={"api_key": "", "request_timeout_s": None, "port": 9000},
                                       environ={"SUBSPEC_SERVER_PORT": "", "SUBSPEC_SERVER_MAX_QUEUE": ""})
    assert settings.api_key is None and settings.request_timeout_s is None
    assert settings.port == 9000 and settings.max_queue == ServerSettings().max_queue  # empty env: not set
    assert resolve_server_settings(environ={"SUBSPEC_SERVER_API_KEY": "none"}).api_key == "none"
    with pytest.raises(ValueError, match="port cannot be empty"):
        resolve_server_settings(yaml_section={"port": None})


def test_redacted_hides_the_key():
    assert ServerSettings(api_key="secret").redacted()["api_key"] == "***"


def test_reliability_flags():
    args = parse("--heartbeat-timeout", "20", "--max-body-bytes", "2000000", "--read-timeout", "10",
                 "--shutdown-timeout", "5")
    settings = resolve_server_settings(cli_overrides=settings_overrides(args))
    got = (settings.heartbeat_timeout_s, settings.max_body_bytes, settings.read_timeout_s, settings.shutdown_timeout_s)
    assert got == (20.0, 2_000_000, 10.0, 5.0)
    defaults = ServerSettings()
    assert defaults.heartbeat_timeout_s <= 60 and defaults.shutdown_timeout_s == 30 and defaults.max_body_bytes is None


def test_default_body_limit_follows_the_context_within_a_few_mib():
    assert default_body_limit(512) == MIB  # the floor
    assert default_body_limit(65536) == 2 * MIB  # 32 bytes per token
    assert default_body_limit(1 << 20) == 4 * MIB  # the ceiling


def test_api_key_from_subspec_api_key():
    """The Docker entry point leaves the key in SUBSPEC_API_KEY (never on the command line)."""
    assert resolve_server_settings(environ={"SUBSPEC_API_KEY": "sk-env"}).api_key == "sk-env"
    assert resolve_server_settings(environ={"SUBSPEC_API_KEY": ""}).api_key is None
    both = {"SUBSPEC_API_KEY": "general", "SUBSPEC_SERVER_API_KEY": "specific"}
    assert resolve_server_settings(environ=both).api_key == "specific"
    args = parse("--api-key", "flag")
    assert resolve_server_settings(environ=both, cli_overrides=settings_overrides(args)).api_key == "flag"


def test_chat_template_flag_names_an_existing_file(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0].content }}")
    args = parse("--chat-template", str(template))
    assert resolve_server_settings(cli_overrides=settings_overrides(args)).chat_template == str(template)
    with pytest.raises(ValueError, match="no such file"):
        resolve_server_settings(environ={"SUBSPEC_SERVER_CHAT_TEMPLATE": str(tmp_path / "missing.jinja")})
