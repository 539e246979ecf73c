"""Credentials out of URLs and error messages, before either is printed or logged.

A Redis or database URL carries secrets in two places: the password of its user-info
(``redis://user:PASSWORD@host``) and query parameters (``?password=...``,
``?sslpassword=...``, ``?token=...``). :func:`redact_url` replaces both with ``***``;
:func:`redact_text` does the same to any text that may quote a URL or a piece of it, such
as a driver's or a URL parser's error message. The command line, the flush worker and
the repository's development tools (the bring-up of the tests and the demo) print URLs
only through these two functions.

The rule, in full:

- **User-info**: what follows the first ``:`` after ``://`` up to an ``@`` is the
  password and is replaced. Parsers disagree on where a malformed URL's user-info ends
  (SQLAlchemy at the *last* ``@``, and accepts ``/``, ``?`` and ``@`` in a password;
  urllib and redis-py at the first ``/``, ``?`` or ``#``): both readings are masked. The
  user name stays: it names an identity, which an operator needs to see, not a secret.
- **Query parameters** (after the first ``?``, and after the first ``?`` that follows the
  last ``@``): a parameter whose name (percent-decoded, in any case) contains
  one of :data:`SECRET_WORDS` (``pass``, ``pwd``, ``secret``, ``token``, ``key``,
  ``auth``, ``cred``) has its value replaced. Paths such as ``sslkey`` or ``passfile``
  are hidden too: hiding a harmless value costs little, showing a secret costs a lot.
- **Messages**: every secret of the URL (as written and percent-decoded) is replaced
  wherever it appears, and so is any quoted fragment of the message (``'...'`` or
  ``"..."``, the way parsers echo the piece they choke on) that lies inside
  a secret, or is a piece of the URL that overlaps one: a parser that splits a malformed
  URL in the wrong place quotes a piece of the password, as in ``Port could not be cast
  to integer value as 's3'`` for ``redis://u:s3/cret@host/0``. Such a fragment is masked
  even when it is also harmless text found elsewhere (a one-letter host name that occurs
  in the password): hiding too much costs little.
- **Short secrets** (fewer than :data:`SHORT_SECRET` characters) are replaced in a message
  only where they stand alone, not inside a longer word: a one-letter password ``a``
  would otherwise turn ``connecting to cache`` into ``connecting to c***che``, a message
  nobody can read. A parser echoing such a password quotes it or cuts the URL at a
  delimiter, which the rules above still mask.

Neither function raises, whatever the input: a malformed URL is exactly when an error
message must be printed safely.

Example::

    >>> redact_url("redis://app:s3cret@cache:6379/0?ssl_password=x&db=1")
    'redis://app:***@cache:6379/0?ssl_password=***&db=1'
"""

from __future__ import annotations

import re
from itertools import pairwise
from urllib.parse import unquote, unquote_plus

__all__ = ["MASK", "SECRET_WORDS", "SHORT_SECRET", "redact_text", "redact_url", "url_secrets"]

MASK = "***"
"""What a secret is replaced with."""

SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "auth", "cred")
"""A query parameter whose name contains one of these (in any case) holds a secret."""

SHORT_SECRET = 4
"""A secret shorter than this is masked in a message only where it stands as a whole word."""


def _query_spans(url: str, start: int) -> list[tuple[int, int]]:
    """The spans of the secret values among the parameters that begin at ``start``."""
    spans = []
    for part in url[start:].split("&"):
        name, sep, value = part.partition("=")
        lowered = unquote_plus(name).lower()
        if sep and value and any(word in lowered for word in SECRET_WORDS):
            spans.append((start + len(name) + 1, start + len(part)))
        start += len(part) + 1
    return spans


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` spans of ``url`` that hold secrets, sorted, not overlapping.

    Parsers disagree on a malformed URL: SQLAlchemy ends the user-info at the last ``@``,
    urllib (so redis-py) at the first ``/``, ``?`` or ``#``. Whatever either would take
    for a password or a secret parameter is masked.
    """
    spans: list[tuple[int, int]] = []
    scheme_end = url.find("://")
    after_at = 0
    if scheme_end >= 0:
        start = scheme_end + 3
        authority_end = min(
            (i for i in (url.find(c, start) for c in "/?#") if i >= 0), default=len(url)
        )
        for at in {url.rfind("@"), url.rfind("@", start, authority_end)}:
            colon = url.find(":", start, at) if at > start else -1
            if colon >= 0:
                spans.append((colon + 1, at))
        after_at = max(url.rfind("@"), 0)
    for question in {url.find("?"), url.find("?", after_at)}:
        if question >= 0:
            spans += _query_spans(url, question + 1)
    return _merged([span for span in spans if span[1] > span[0]])


def redact_url(url: str) -> str:
    """``url`` with its password and secret query parameters replaced by ``***``.

    Never raises: a malformed URL is masked by the same textual rule (see the module's
    docstring), so it can be shown in the error that says it is malformed.

    Example::

        >>> redact_url("postgresql+psycopg://app:pw@db/shop?sslpassword=k&sslmode=require")
        'postgresql+psycopg://app:***@db/shop?sslpassword=***&sslmode=require'
        >>> redact_url("redis://u:p@[::1/0")
        'redis://u:***@[::1/0'
    """
    out, position = [], 0
    for start, end in _secret_spans(url):
        out += [url[position:start], MASK]
        position = end
    out.append(url[position:])
    return "".join(out)


def url_secrets(url: str) -> list[str]:
    """The secrets ``url`` holds, as written and percent-decoded, longest first.

    Example::

        >>> url_secrets("redis://:p%40ss@h/0?token=t")
        ['p%40ss', 'p@ss', 't']
    """
    found: set[str] = set()
    for secret in (url[start:end] for start, end in _secret_spans(url)):
        found.update(s for s in (secret, unquote(secret), unquote_plus(secret)) if s)
    return sorted(found, key=lambda s: (-len(s), s))


def _overlaps(fragment: str, url: str, spans: list[tuple[int, int]]) -> bool:
    """True when ``fragment`` occurs in ``url`` across or inside one of its secret spans."""
    found = url.find(fragment)
    while found >= 0:
        if any(found < end and found + len(fragment) > start for start, end in spans):
            return True
        found = url.find(fragment, found + 1)
    return False


def redact_text(text: str, *urls: str | None) -> str:
    """``text`` without any secret of ``urls``: for error messages that may quote them.

    Each URL is first replaced by its :func:`redact_url` form wherever it appears whole,
    then each of its secrets wherever it appears alone, then each quoted fragment that
    is a piece of the URL overlapping a secret, or a piece of a secret (see the module's
    docstring).

    Example::

        >>> redact_text("Port could not be cast to integer value as 's3'", "redis://u:s3/x@h/0")
        "Port could not be cast to integer value as '***'"
    """
    found: list[tuple[str, list[tuple[int, int]]]] = []
    secrets: set[str] = set()
    for url in urls:
        spans = _secret_spans(url) if url else []
        if url and spans:
            found.append((url, spans))
            secrets.update(url_secrets(url))
            text = text.replace(url, redact_url(url))
    if not found:
        return text
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= SHORT_SECRET:
            text = text.replace(secret, MASK)
        else:
            alone = rf"(?<![^\W_]){re.escape(secret)}(?![^\W_])"
            text = re.sub(alone, MASK, text)

    masked: list[tuple[int, int]] = []
    for start, end in _quoted(text):
        inner = text[start:end]
        if any(inner in secret for secret in secrets) or any(
            _overlaps(inner, url, spans) for url, spans in found
        ):
            masked.append((start, end))
    for start, end in reversed(_merged(masked)):  # from the end: positions stay valid
        text = text[:start] + MASK + text[end:]
    return text


def _quoted(text: str) -> list[tuple[int, int]]:
    """The spans between each two successive quotes of a kind (``'`` or ``"``).

    Every pair of successive quotes is tried, not only the pairs a left-to-right reading
    makes: in ``can't parse 's3'`` the apostrophe must not hide the quoted ``s3``.
    """
    spans: list[tuple[int, int]] = []
    for quote in "'\"":
        positions = [i for i, ch in enumerate(text) if ch == quote]
        spans += [(a + 1, b) for a, b in pairwise(positions) if b > a + 1]
    return spans


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` sorted, the overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out
