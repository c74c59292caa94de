"""Fixtures for tests that need a real PostgreSQL on 127.0.0.1:5432.

Use them by importing into a test module (pytest finds fixtures in the module's namespace)::

    from tests.postgres_support import pg_table_fixture, postgres_url_fixture  # noqa: F401

and name ``postgres_url`` / ``pg_table`` as test parameters.

``postgres_url`` checks that PostgreSQL accepts a connection and answers ``SELECT 1`` (within a
short deadline) and gives its SQLAlchemy URL (user ``postgres``, trust authentication, database
``test``). When it does not answer, the test is skipped with the reason, or fails when the
environment sets ``LM_GATEWAY_REQUIRE_SERVICES=1`` (CI does: there a missing PostgreSQL is a
broken build, not a reason to skip). ``pg_table`` gives the test a unique table name
(``lmgw_test_<hex>``), so concurrent or repeated tests never see each other's rows, and drops
that table after the test.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.redis_support import services_required

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_URL = f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
#: How long the reachability check may take to connect (libpq's minimum is 2 s).
CONNECT_DEADLINE = 3
#: The prefix of every table name :func:`pg_table_fixture` gives.
TABLE_PREFIX = "lmgw_test_"
START_HINT = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def postgres_problem(url: str = POSTGRES_URL) -> str | None:
    """None when PostgreSQL at ``url`` accepts a connection and answers ``SELECT 1`` in time,
    else what went wrong."""
    try:
        import sqlalchemy as sa
    except ImportError as exc:  # pragma: no cover - SQLAlchemy is a test dependency
        return f"SQLAlchemy is not installed ({exc})"
    try:
        engine = sa.create_engine(
            url, poolclass=sa.NullPool, connect_args={"connect_timeout": CONNECT_DEADLINE}
        )
    except Exception as exc:  # the driver (psycopg) is missing, a malformed URL...
        return f"cannot use {url} ({type(exc).__name__}: {exc})"
    try:
        with engine.connect() as connection:
            answer = connection.execute(sa.text("SELECT 1")).scalar()
    except Exception as exc:  # connection refused, timeout, authentication, no database...
        message = " ".join(str(exc).split()).split(" (Background on this error")[0]
        return f"PostgreSQL at {url} is not reachable ({type(exc).__name__}: {message})"
    finally:
        engine.dispose()
    if answer != 1:
        return f"PostgreSQL at {url} answered SELECT 1 with {answer!r}"
    return None


def require_postgres(url: str = POSTGRES_URL) -> str:
    """``url`` if PostgreSQL is reachable; otherwise skip the test, or fail it when services
    are required (``LM_GATEWAY_REQUIRE_SERVICES=1``).

    Synchronous (a blocking connect with a short timeout), so it works in plain fixtures,
    before the test's own trio run starts: a skip raised there keeps its reason.
    """
    problem = postgres_problem(url)
    if problem is None:
        return url
    start = f"start it with: {START_HINT}"
    if services_required():
        pytest.fail(f"{problem}; LM_GATEWAY_REQUIRE_SERVICES=1 requires it ({start})")
    pytest.skip(f"{problem}; {start} (set LM_GATEWAY_REQUIRE_SERVICES=1 to fail instead)")


def drop_table(url: str, table: str) -> None:
    """Drop ``table`` (and its indexes) if it exists."""
    import sqlalchemy as sa

    engine = sa.create_engine(
        url, poolclass=sa.NullPool, connect_args={"connect_timeout": CONNECT_DEADLINE}
    )
    try:
        with engine.begin() as connection:
            quoted = engine.dialect.identifier_preparer.quote(table)
            connection.execute(sa.text(f"DROP TABLE IF EXISTS {quoted}"))
    finally:
        engine.dispose()


# The fixtures are registered under their short names (``postgres_url``, ``pg_table``) but
# defined under longer ones, so a test module importing them does not trip ruff's
# "redefinition" check when a test takes ``pg_table`` as a parameter.


@pytest.fixture(name="postgres_url")
def postgres_url_fixture() -> str:
    """The SQLAlchemy URL of the local PostgreSQL (skips or fails the test when it is not
    reachable)."""
    return require_postgres(POSTGRES_URL)


@pytest.fixture(name="pg_table")
def pg_table_fixture(postgres_url: str) -> Iterator[str]:
    """A unique table name for this test (``lmgw_test_<hex>``); the table is dropped
    afterwards.

    A plain fixture: setup and cleanup run outside the test's trio run (cleanup after it).
    """
    table = f"{TABLE_PREFIX}{secrets.token_hex(6)}"
    yield table
    drop_table(postgres_url, table)


#: The short names work as imports too (``from tests.postgres_support import postgres_url``).
postgres_url = postgres_url_fixture
pg_table = pg_table_fixture
