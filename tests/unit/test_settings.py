"""Settings come from SMARTSPACE_* variables and are validated at start-up; a bad value names its variable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import get_type_hints

import pytest

from server.settings import PREFIX, Settings, SettingsError, load_settings

HINTS = get_type_hints(Settings)


def fields_of(type_: type) -> list[str]:
    return [f for f in Settings.__struct_fields__ if HINTS[f] is type_]


def test_no_configuration_gives_the_documented_defaults(tmp_path):
    settings = load_settings({}, dotenv=None)
    assert (settings.host, settings.port, settings.database_url, settings.redis_url) == ("127.0.0.1", 8080, "", "")
    assert settings.migrate_on_start is True
    s = Settings(data_dir=str(tmp_path / "d"))
    assert s.resolved_database_url == f"sqlite+aiosqlite:///{(tmp_path / 'd').resolve() / 'smartspace.db'}"


def test_values_are_converted_by_type():
    settings = load_settings({
        "SMARTSPACE_PORT": "9001", "SMARTSPACE_ACCESS_LOG": "off", "SMARTSPACE_MIGRATE_ON_START": "No",
        "SMARTSPACE_SWEEP_INTERVAL_SECONDS": "0.5", "SMARTSPACE_SETTLEMENT_BATCH_MICROS": "5_000_000",
        "SMARTSPACE_ADMIN_EMAILS": " a@x.io, b@y.io ,", "SMARTSPACE_DATABASE_URL": "postgresql+asyncpg://h/db",
        "SMARTSPACE_REDIS_URL": "redis://127.0.0.1:6379/0", "SMARTSPACE_LOG_LEVEL": "debug",
    }, dotenv=None)
    assert settings.port == 9001
    assert settings.access_log is False and settings.migrate_on_start is False
    assert settings.sweep_interval_seconds == 0.5
    assert settings.settlement_batch_micros == 5_000_000
    assert settings.admin_emails == ("a@x.io", "b@y.io")
    assert settings.resolved_database_url == "postgresql+asyncpg://h/db"


@pytest.mark.parametrize("raw", ["1", "true", "YES", "on"])
def test_true_spellings(raw):
    assert load_settings({"SMARTSPACE_ACCESS_LOG": raw}, dotenv=None).access_log is True


def _fails(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(env, dotenv=None)
    return str(caught.value)


@pytest.mark.parametrize("field", fields_of(int))
def test_every_integer_setting_rejects_a_non_integer_by_name(field):
    var = PREFIX + field.upper()
    message = _fails({var: "abc"})
    assert var in message and "integer" in message


@pytest.mark.parametrize("field", fields_of(float))
def test_every_number_setting_rejects_a_non_number_by_name(field):
    var = PREFIX + field.upper()
    assert var in _fails({var: "fast"})


@pytest.mark.parametrize("field", fields_of(bool))
def test_every_boolean_setting_rejects_other_words_by_name(field):
    var = PREFIX + field.upper()
    assert var in _fails({var: "maybe"})


@pytest.mark.parametrize(("var", "raw"), [
    ("SMARTSPACE_PORT", "0"), ("SMARTSPACE_PORT", "65536"), ("SMARTSPACE_PORT", "-1"),
    ("SMARTSPACE_LOG_LEVEL", "LOUD"),
    ("SMARTSPACE_DATABASE_URL", "mysql://localhost/db"),
    ("SMARTSPACE_DATABASE_URL", "postgresql://no-async-driver/db"),
    ("SMARTSPACE_REDIS_URL", "http://localhost:6379"),
    ("SMARTSPACE_ACCESS_TOKEN_TTL_SECONDS", "0"),
    ("SMARTSPACE_DATABASE_POOL_SIZE", "0"),
    ("SMARTSPACE_RESERVATION_TTL_SECONDS", "-5"),
    ("SMARTSPACE_CHAIN", "mainnet"),
    ("SMARTSPACE_CONFIRMATIONS", "0"),
    ("SMARTSPACE_USDC_ADDRESS", "0x3600000000000000000000000000000000000000 "),
    ("SMARTSPACE_REVENUE_ADDRESS", "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cf"),  # fails EIP-55
    ("SMARTSPACE_REVENUE_ADDRESS", "0x1234"),
])
def test_out_of_range_values_name_their_variable(var, raw):
    message = _fails({var: raw})
    assert var in message and raw in message


RPC_OK = {"SMARTSPACE_CHAIN": "rpc", "SMARTSPACE_CHAIN_RPC_URL": "http://127.0.0.1:8545",
          "SMARTSPACE_TREASURY_PRIVATE_KEY": "0x" + "7a" * 32,
          "SMARTSPACE_USDC_ADDRESS": "0x3600000000000000000000000000000000000000"}


@pytest.mark.parametrize("missing", ["SMARTSPACE_CHAIN_RPC_URL", "SMARTSPACE_TREASURY_PRIVATE_KEY",
                                     "SMARTSPACE_USDC_ADDRESS"])
def test_rpc_chain_needs_its_node_key_and_token(missing):
    message = _fails({k: v for k, v in RPC_OK.items() if k != missing})
    assert message.startswith(missing + " is not set") and "SMARTSPACE_CHAIN=rpc" in message
    assert load_settings(RPC_OK, dotenv=None).chain == "rpc"
    assert load_settings({k: v for k, v in RPC_OK.items() if k != missing and k != "SMARTSPACE_CHAIN"},
                         dotenv=None).chain == "devnet"  # devnet needs none of them


def test_a_malformed_treasury_key_is_refused_without_echoing_it():
    message = _fails({**RPC_OK, "SMARTSPACE_TREASURY_PRIVATE_KEY": "0xdeadbeef"})
    assert "SMARTSPACE_TREASURY_PRIVATE_KEY" in message and "64 hex digits" in message
    assert "deadbeef" not in message


def test_a_misspelt_variable_is_named_not_ignored():
    assert "SMARTSPACE_PROT" in _fails({"SMARTSPACE_PROT": "8080"})


def test_test_variables_and_other_programs_variables_are_ignored():
    settings = load_settings({"SMARTSPACE_TEST_DATABASE_URL": "x", "PORT": "abc", "HOME": "/root"}, dotenv=None)
    assert settings.port == 8080


def test_a_dotenv_file_is_read_and_the_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nSMARTSPACE_PORT=9100\nSMARTSPACE_HOST='0.0.0.0'\n\nnot a pair\n")
    settings = load_settings({"SMARTSPACE_HOST": "10.0.0.1"}, dotenv=env_file)
    assert (settings.port, settings.host) == (9100, "10.0.0.1")
    env_file.write_text("SMARTSPACE_PORT=abc\n")
    assert "SMARTSPACE_PORT" in _fails_dotenv(env_file)


DOTENV_CASES = """\
# the cases a hand-written parser got wrong
export SMARTSPACE_PORT=9123
SMARTSPACE_HOST=0.0.0.0   # bind everywhere
SMARTSPACE_ADMIN_EMAILS="ops@example.com, cfo@example.com"  # quoted, then a comment
SMARTSPACE_LOG_LEVEL='warning'
SMARTSPACE_UPSTREAMS='[
  {"provider": "ollama", "kind": "openai", "base_url": "http://127.0.0.1:11434/v1"},
  {"provider": "openai", "base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"}
]'
SMARTSPACE_DATA_DIR=${HOME_FOR_TEST}/data
JUST_A_NAME
"""


def test_dotenv_is_parsed_exactly_as_python_dotenv_parses_it(tmp_path, monkeypatch):
    from dotenv import dotenv_values

    from server.providers import parse_upstreams

    monkeypatch.setenv("HOME_FOR_TEST", str(tmp_path))
    env_file = tmp_path / ".env"
    env_file.write_text(DOTENV_CASES)
    theirs = {k: v for k, v in dotenv_values(env_file).items() if k.startswith(PREFIX)}
    settings = load_settings({}, dotenv=env_file)
    ours = {PREFIX + f.upper(): getattr(settings, f) for f in Settings.__struct_fields__}
    assert settings.port == 9123 == int(theirs["SMARTSPACE_PORT"])  # the export line counts
    assert settings.host == "0.0.0.0" == theirs["SMARTSPACE_HOST"]  # the inline comment does not
    assert settings.admin_emails == ("ops@example.com", "cfo@example.com")
    assert settings.log_level == "warning" == theirs["SMARTSPACE_LOG_LEVEL"]
    assert settings.data_dir == f"{tmp_path}/data" == theirs["SMARTSPACE_DATA_DIR"]
    assert ours["SMARTSPACE_UPSTREAMS"] == theirs["SMARTSPACE_UPSTREAMS"]  # the whole multi-line JSON
    assert [u.provider for u in parse_upstreams(settings.upstreams)] == ["ollama", "openai"]


def _fails_dotenv(path: Path) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings({}, dotenv=path)
    return str(caught.value)


def test_the_generated_jwt_secret_is_private_and_stable(tmp_path):
    s = Settings(data_dir=str(tmp_path / "data"))
    first = s.resolved_jwt_secret
    assert len(first) >= 32
    assert Settings(data_dir=str(tmp_path / "data")).resolved_jwt_secret == first
    mode = stat.S_IMODE((tmp_path / "data" / "jwt-secret").stat().st_mode)
    assert mode == 0o600
    explicit = "e" * 32
    assert Settings(data_dir=str(tmp_path / "data"), jwt_secret=explicit).resolved_jwt_secret == explicit


def test_a_short_jwt_secret_is_refused_without_echoing_it():
    message = _fails({"SMARTSPACE_JWT_SECRET": "hunter2"})
    assert "SMARTSPACE_JWT_SECRET" in message and "32" in message and "hunter2" not in message


# ---------------------------------------------------------------- the command line
def _smartspace(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("smartspace")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    return subprocess.run(command + args, env={**clean, **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("command", [["serve"], ["migrate"]])
def test_the_cli_refuses_to_start_with_a_bad_setting_and_names_it(tmp_path, command):
    result = _smartspace(command, {"SMARTSPACE_PORT": "abc", "SMARTSPACE_DATA_DIR": str(tmp_path / "d")}, tmp_path)
    assert result.returncode != 0
    assert "SMARTSPACE_PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d" / "smartspace.db").exists()  # it stopped before touching anything


def test_the_cli_reads_a_bad_value_from_dotenv_too(tmp_path):
    (tmp_path / ".env").write_text("SMARTSPACE_ACCESS_LOG=sometimes\n")
    result = _smartspace(["serve"], {"SMARTSPACE_DATA_DIR": str(tmp_path / "d")}, tmp_path)
    assert result.returncode != 0
    assert "SMARTSPACE_ACCESS_LOG" in result.stderr


def test_error_messages_do_not_echo_passwords():
    message = _fails({"SMARTSPACE_DATABASE_URL": "mysql://app:hunter2@db.internal/prod"})
    assert "SMARTSPACE_DATABASE_URL" in message and "hunter2" not in message
    assert "app:***@db.internal" in message
    message = _fails({"SMARTSPACE_REDIS_URL": "http://:s3cret@cache:6379"})
    assert "s3cret" not in message


def test_serve_with_an_unreachable_database_exits_with_a_hint_not_a_traceback(tmp_path):
    env = {"SMARTSPACE_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere",
           "SMARTSPACE_DATA_DIR": str(tmp_path / "d")}
    result = _smartspace(["serve", "--port", "1"], env, tmp_path)
    assert result.returncode != 0
    assert "SMARTSPACE_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_taken_port_exits_naming_the_port(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _smartspace(["serve", "--port", str(port)], {"SMARTSPACE_DATA_DIR": str(tmp_path / "d")}, tmp_path)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "SMARTSPACE_PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert "serving on" not in result.stderr  # it never was
    assert len([line for line in result.stderr.splitlines() if line.startswith("smartspace:")]) == 1


@pytest.mark.parametrize("port", ["abc", "0", "70000"])
def test_serve_refuses_a_bad_port_option(tmp_path, port):
    result = _smartspace(["serve", "--port", port], {"SMARTSPACE_DATA_DIR": str(tmp_path / "d")}, tmp_path)
    assert result.returncode == 2
    assert "--port" in result.stderr and port in result.stderr


def _one_line_config_error(result: subprocess.CompletedProcess[str], var: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one line, no traceback, no log noise
    assert lines[0].startswith("smartspace: configuration error: " + var)
    return lines[0]


@pytest.mark.parametrize(("raw", "says"), [
    ("[{\"provider\": \"ollama\", \"base_url\": ", "JSON list"),  # cut short
    ("{\"provider\": \"openai\"}", "JSON list"),  # an object, not a list
    ("[{\"provider\": \"ollama\", \"base_url\": \"127.0.0.1:11434\"}]", "http(s) base_url"),
    ("[{\"provider\": \"ollama\", \"base_url\": \"http://x\", \"colour\": \"red\"}]", "colour"),
])
def test_serve_with_bad_upstreams_prints_one_line_naming_the_variable(tmp_path, raw, says):
    result = _smartspace(["serve", "--port", "1"], {"SMARTSPACE_UPSTREAMS": raw,
                                                    "SMARTSPACE_DATA_DIR": str(tmp_path / "d")}, tmp_path)
    assert says in _one_line_config_error(result, "SMARTSPACE_UPSTREAMS")
    assert "serving on" not in result.stderr


@pytest.mark.parametrize("missing", ["SMARTSPACE_USDC_ADDRESS", "SMARTSPACE_TREASURY_PRIVATE_KEY"])
def test_serve_in_rpc_mode_without_its_requirements_prints_one_line(tmp_path, missing):
    env = {k: v for k, v in RPC_OK.items() if k != missing}
    result = _smartspace(["serve", "--port", "1"], {**env, "SMARTSPACE_DATA_DIR": str(tmp_path / "d")}, tmp_path)
    line = _one_line_config_error(result, missing)
    assert "when SMARTSPACE_CHAIN=rpc" in line and "0x" + "7a" * 32 not in result.stderr
    assert not (tmp_path / "d" / "smartspace.db").exists()


def test_serve_says_serving_once_the_port_from_an_export_line_is_bound(tmp_path):
    import socket

    with socket.socket() as probe:  # a free port, handed to the server through `export` in .env
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / ".env").write_text(f"export SMARTSPACE_PORT={port}  # from .env\n"
                                   f"SMARTSPACE_DATA_DIR={tmp_path / 'd'}\nSMARTSPACE_ACCESS_LOG=false\n")
    script = Path(sys.executable).with_name("smartspace")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    proc = subprocess.Popen([str(script), "serve"], env=clean, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:  # blocks until the server says something (or exits: EOF)
            seen.append(line)
            if "serving on" in line:
                break
        assert any(f"serving on http://127.0.0.1:{port}" in line for line in seen), "".join(seen)
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # bound before it said so
            pass
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cors_origins_are_a_comma_separated_list_of_bare_origins():
    settings = load_settings({"SMARTSPACE_CORS_ORIGINS": "https://app.example.com, http://localhost:5173,"},
                             dotenv=None)
    assert settings.cors_origins == ("https://app.example.com", "http://localhost:5173")
    assert load_settings({}, dotenv=None).cors_origins == ()
    for bad in ("app.example.com", "https://app.example.com/", "https://app.example.com/path", "ftp://x"):
        message = _fails({"SMARTSPACE_CORS_ORIGINS": bad})
        assert "SMARTSPACE_CORS_ORIGINS" in message and "no path" in message
