"""URLs and error messages lose every credential, whatever the URL looks like."""

from __future__ import annotations

import doctest
from collections.abc import Callable

import pytest
import redis
import sqlalchemy as sa
from hypothesis import example, given
from hypothesis import strategies as st

import devservices
from sa_redis_cache import redaction
from sa_redis_cache.redaction import redact_text, redact_url, url_secrets


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://app:pw@h:6379/0", "redis://app:***@h:6379/0"),
        ("redis://app@h:6379/0", "redis://app@h:6379/0"),  # a user name is no secret
        ("redis://h:1/0?password=s3cret", "redis://h:1/0?password=***"),
        ("redis://h/0?db=1&Password=s&x=2", "redis://h/0?db=1&Password=***&x=2"),
        (
            "rediss://h/0?ssl_password=s&ssl_keyfile=/k",
            "rediss://h/0?ssl_password=***&ssl_keyfile=***",
        ),
        ("redis://h/0?pass%77ord=s", "redis://h/0?pass%77ord=***"),  # names are decoded
        ("redis://h/0?token=", "redis://h/0?token="),  # nothing to hide
        (
            "postgresql+psycopg://u@h/db?password=s3cret&sslmode=require",
            "postgresql+psycopg://u@h/db?password=***&sslmode=require",
        ),
        (
            "postgresql+psycopg://u:pw@h/db?sslpassword=k&apikey=a&auth_token=t&cred=c",
            "postgresql+psycopg://u:***@h/db?sslpassword=***&apikey=***&auth_token=***&cred=***",
        ),
        # malformed: the same textual rule, never an exception
        ("redis://u:p@[::1/0", "redis://u:***@[::1/0"),
        ("redis://u:s3/cret@h/0", "redis://u:***@h/0"),
        ("postgresql+psycopg://u:s3?cret@h/db", "postgresql+psycopg://u:***@h/db"),
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),  # the last @ ends the user-info
        ("not a url ?password=x", "not a url ?password=***"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_devservices_redacts_with_the_same_function() -> None:
    assert devservices.redact("redis://h:1/0?password=s3cret") == "redis://h:1/0?password=***"


def test_the_secrets_of_a_url_as_written_and_decoded() -> None:
    assert url_secrets("redis://:p%40ss@h/0?token=t+u") == ["p%40ss", "p@ss", "t u", "t+u"]
    assert url_secrets("redis://u@h/0") == []


def _error_of(make: Callable[[str], object], url: str) -> Exception | None:
    try:
        make(url)
    except Exception as exc:  # whatever a parser raises is printed, redacted
        return exc
    return None


@pytest.mark.parametrize(
    ("url", "make", "complaint"),
    [
        ("redis://u:s3/cret@h/0", redis.Redis.from_url, "integer value as"),  # quotes 's3'
        ("redis://u:s3cret@h:1x/0", redis.Redis.from_url, "integer value as"),
        ("redis://u:s3cret@[::1/0", redis.Redis.from_url, "Invalid IPv6 URL"),
        ("postgresql+psycopg://u:s3cret@[::1/db", sa.make_url, "invalid literal"),
        ("postgresql+psycopg://u:s3:cret@h:port/db", sa.make_url, "invalid literal"),
    ],
)
def test_parser_errors_lose_every_piece_of_the_password(
    url: str, make: Callable[[str], object], complaint: str
) -> None:
    error = _error_of(make, url)
    assert complaint in str(error)
    text = redact_text(f"{url!r} is not a URL: {error}", url)
    for piece in ("s3", "cret", "s3cret"):
        assert piece not in text, text
    assert complaint in text


def test_redact_text_keeps_what_is_no_secret() -> None:
    url = "redis://u:hunter22@cache:6379/0"
    message = "Error 111 connecting to cache:6379. Connection refused; can't 'connect' to 'cache'"
    assert redact_text(message, url) == message
    assert redact_text(f"at {url}: 'hunt' and 'er22@cache'", url) == (
        "at redis://u:***@cache:6379/0: '***' and '***'"
    )
    assert redact_text("no urls", None, "") == "no urls"


def test_a_short_password_is_masked_where_it_stands_alone_not_inside_words() -> None:
    url = "redis://app:a@cache:6379/0"
    message = f"Error 111 connecting to cache:6379 for {url}: AUTH a failed, saw 'a'"
    assert redact_text(message, url) == (
        "Error 111 connecting to cache:6379 for redis://app:***@cache:6379/0: "
        "AUTH *** failed, saw '***'"
    )


_PASSWORD = st.text(alphabet=st.sampled_from("abcXYZ019:/?#@[]%&=+ .-"), min_size=1, max_size=24)


@given(text=_PASSWORD, query=st.booleans())
@example(text="s3/cret", query=False)
@example(text="a?b@c", query=False)
@example(text="x&y=z", query=True)
@example(text="00 ?", query=False)
@example(text="00][", query=False)
def test_no_password_survives_redaction(text: str, query: bool) -> None:
    # the password is wrapped in marks that occur nowhere else in the URL, so that a leak
    # of any piece of it is found however a parser cut the URL around it
    secret = f"Q{text}Q"
    if query:
        url = f"redis://h:6379/0?db=0&password={secret.replace('&', '%26')}"
    else:
        url = f"redis://user:{secret}@h:6379/0"
    shown = redact_url(url)
    assert "Q" not in shown, shown
    errors = [_error_of(make, url) for make in (redis.Redis.from_url, sa.make_url)]
    message = redact_text(" ".join(f"{url} {shown} {e!r} {e}" for e in errors if e), url)
    assert "Q" not in message, message


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(redaction)
    assert tried > 0
    assert failures == 0
