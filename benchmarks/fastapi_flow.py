"""The FastAPI + SQLModel example under a short login-then-profile load (issue 16).

Runs ``examples/fastapi_app.py`` twice on one database, through FastAPI's test client
(the app's sync endpoints in its thread pool, the async ones on its event loop): without
the cache, then with it (its lifespan attaches both session factories with
``cache_queries``). Each flow is ``POST /login`` (sync: the user by e-mail), ``GET /me``
(async: ``session.get(User, token.sub)`` with the ``str`` sub, then the user's posts) and
``GET /users/{id}`` (sync: the entity cache and a lazy-loaded collection); in the passes
with writes, every 20th flow also writes (``PATCH /me``), and the next ``/me`` must read
the new value. Reported, for the read-only load and the one with writes: SQL statements
per request with and without the cache, the cache's hit rate, and the WARNING lines
logged (any logger), which must be 0.

Run it::

    python -m devservices -- python -m benchmarks.fastapi_flow \\
        --out benchmarks/results/fastapi_flow.md
"""

from __future__ import annotations

import argparse
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient

from devservices import bring_up
from devservices.scratch import scratch_database
from examples import fastapi_app
from sa_redis_cache.redis_io import unlink_matching

USERS = 40
FLOWS = 200  # 3 requests each, plus a write every WRITE_EVERY flows
WRITE_EVERY = 20


@dataclass
class Run:
    """What one pass measured."""

    requests: int = 0
    statements: int = 0
    seconds: float = 0.0
    warnings: int = 0
    hit_rate: float | None = None
    stale_reads: int = 0

    @property
    def per_request(self) -> float:
        """SQL statements per request."""
        return self.statements / self.requests


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def run(database_url: str, redis_url: str | None, namespace: str, *, writes: bool) -> Run:
    """One pass of ``FLOWS`` flows over ``USERS`` users; the app without cache if no URL."""
    app = fastapi_app.create_app(database_url, redis_url, namespace)
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    for engine in app.state.engines:
        sa.event.listen(engine, "before_cursor_execute", count)
    warned = _Warnings()
    logging.getLogger().addHandler(warned)
    result = Run()
    try:
        with TestClient(app) as client:
            began = time.perf_counter()
            for i in range(FLOWS):
                n = i % USERS + 1
                email, password = f"user{n}@example.com", f"secret-{n}"
                token = client.post("/login", json={"email": email, "password": password})
                headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
                me = client.get("/me", headers=headers).json()
                page = client.get(f"/users/{me['id']}").json()
                assert page["posts"] == 3
                result.requests += 3
                if writes and i % WRITE_EVERY == WRITE_EVERY - 1:
                    bio = f"bio {i}"
                    client.patch("/me", json={"bio": bio}, headers=headers)
                    again = client.get("/me", headers=headers).json()
                    result.stale_reads += again["bio"] != bio
                    result.requests += 2
            result.seconds = time.perf_counter() - began
            cache = app.state.cache
            if cache is not None:
                result.hit_rate = cache.stats()["total"]["hit_rate"]
    finally:
        logging.getLogger().removeHandler(warned)
        for engine in app.state.engines:
            sa.event.remove(engine, "before_cursor_execute", count)
            engine.dispose()
    result.statements = statements[0]
    result.warnings = len(warned.lines)
    for line in warned.lines[:10]:
        print("WARNING", line)
    return result


def report(runs: dict[str, tuple[Run, Run]]) -> str:
    """The figures as a Markdown table: per load, without and with the cache."""
    names = list(runs)
    header = " | ".join(f"{n}, without | {n}, with the cache" for n in names)
    cells: dict[str, list[str]] = {}
    for without, cached in runs.values():
        rate = "-" if cached.hit_rate is None else f"{cached.hit_rate:.1%}"
        for label, a, b in (
            ("requests", f"{without.requests}", f"{cached.requests}"),
            ("SQL statements", f"{without.statements}", f"{cached.statements}"),
            (
                "SQL statements per request",
                f"{without.per_request:.2f}",
                f"{cached.per_request:.2f}",
            ),
            ("cache hit rate", "-", rate),
            ("WARNING lines logged", f"{without.warnings}", f"{cached.warnings}"),
            ("stale reads after a write", f"{without.stale_reads}", f"{cached.stale_reads}"),
            ("wall time, ratio to without", "1.00", f"{cached.seconds / without.seconds:.2f}"),
        ):
            cells.setdefault(label, []).extend([a, b])
    lines = [
        (
            f"FastAPI + SQLModel example: {FLOWS} login-then-profile flows (3 requests each) over "
            f"{USERS} users, through FastAPI's test client, one run; with writes: a profile "
            f"update and a read of it every {WRITE_EVERY} flows."
        ),
        "",
        f"| | {header} |",
        "|---|" + "--:|" * (2 * len(names)),
        *(f"| {label} | {' | '.join(values)} |" for label, values in cells.items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Bring up the services, run both passes on a scratch database, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    namespace = f"bench_fastapi_{secrets.token_hex(4)}"
    with (
        bring_up() as services,
        scratch_database(
            services.database_url, f"sarc_bench_fastapi_{secrets.token_hex(4)}"
        ) as url,
    ):
        database_url = url.render_as_string(hide_password=False)
        engine = sa.create_engine(database_url)
        try:
            fastapi_app.seed(engine, users=USERS)
        finally:
            engine.dispose()
        try:
            runs = {
                load: (
                    run(database_url, None, f"{namespace}_{writes:d}", writes=writes),
                    run(database_url, services.redis_url, f"{namespace}_{writes:d}", writes=writes),
                )
                for load, writes in (("read-only", False), ("with writes", True))
            }
        finally:
            import redis

            client = redis.Redis.from_url(services.redis_url)
            unlink_matching(client, f"sarc:*{namespace}*")
            client.close()
    table = report(runs)
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
