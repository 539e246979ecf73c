"""Without services the bring-up fails with one message that says how to provide them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from devservices import (
    ServicesUnavailable,
    bring_up,
    free_port,
    normalize_database_url,
    redact,
    servers,
)
from devservices.cli import main

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def no_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(servers, "PG_BIN_GLOBS", ())


@pytest.mark.usefixtures("no_binaries")
def test_message_names_every_way_to_provide_the_services() -> None:
    dead = ("127.0.0.1", free_port())
    with (
        pytest.raises(ServicesUnavailable) as caught,
        bring_up(use_env=False, pg_address=dead, redis_address=dead),
    ):
        pytest.fail("bring_up must not yield without services")
    message = str(caught.value)
    for needed in ("DATABASE_URL", "REDIS_URL", "docker compose up -d", "postgres:", "redis:"):
        assert needed in message
    assert f"127.0.0.1:{dead[1]}" in message
    assert "initdb" in message
    assert "redis-server" in message


def test_an_env_url_that_does_not_answer_is_an_error_not_a_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres:secret@127.0.0.1:{port}/postgres")
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    with pytest.raises(ServicesUnavailable) as caught, bring_up():
        pytest.fail("bring_up must not yield without services")
    message = str(caught.value)
    assert f"DATABASE_URL=postgresql+psycopg://postgres:***@127.0.0.1:{port}/postgres" in message
    assert f"REDIS_URL=redis://127.0.0.1:{port}/0 does not answer" in message
    assert "secret" not in message


@pytest.mark.usefixtures("no_binaries")
def test_command_line_reports_the_message_and_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["--print"]) == 1
    assert "docker compose up -d" in capsys.readouterr().err


def test_command_line_needs_print_or_a_command() -> None:
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u@h:1/d", "postgresql+psycopg://u@h:1/d"),
        ("postgresql://u:p@h/d", "postgresql+psycopg://u:p@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
    ],
)
def test_plain_postgres_urls_get_the_psycopg_driver(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected


def test_redact_hides_only_the_password() -> None:
    assert redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("postgresql+psycopg://u:pw@h/d") == "postgresql+psycopg://u:***@h/d"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
