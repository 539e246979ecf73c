"""Names and paths the docs give a user, held to the code (no servers)."""

from __future__ import annotations

import re
from pathlib import Path

import sa_redis_cache
from sa_redis_cache import models

ROOT = Path(__file__).resolve().parents[2]


def test_uncacheable_model_warning_is_importable_from_the_package() -> None:
    """configuration.md: a model with a column the codec cannot round-trip "gets an
    ``UncacheableModelWarning``"; an application that filters or escalates it needs the
    class, which was only reachable through the private-looking ``sa_redis_cache.models``."""
    assert "UncacheableModelWarning" in sa_redis_cache.__all__
    warning = sa_redis_cache.UncacheableModelWarning
    assert warning is models.UncacheableModelWarning
    assert issubclass(warning, UserWarning)


def test_the_script_folder_security_md_names_exists() -> None:
    """security.md says the ACL lists include "the commands inside" the Lua scripts'
    folder; it named ``sa_redis_cache/lua``, which does not exist."""
    text = (ROOT / "docs" / "security.md").read_text()
    named = re.findall(r"`(sa_redis_cache/[\w/]+)/\*\.lua`", text)
    assert named, "security.md no longer names the scripts' folder"
    for folder in named:
        assert list((ROOT / folder).glob("*.lua")), f"{folder} holds no Lua script"
