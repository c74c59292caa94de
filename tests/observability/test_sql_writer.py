"""SQLLogWriter against real databases: SQLite in a temporary file and the local PostgreSQL.

Nothing is mocked. The writer is called directly for the table, column and idempotency checks;
the PostgreSQL burst and outage tests go through a real gateway (Hypercorn on loopback, the
echo connection) with a ``BaseLogger`` + ``SQLLogWriter`` configured as users write it. The
burst test leaves ``run_gateway`` right after the answers, so the shutdown flush has to write
what is still queued; the last test makes that flush wait for a database that comes back.

The outage tests put a small loopback TCP proxy between the writer and PostgreSQL: taking it
"down" closes every connection it carries and closes new ones as soon as they are accepted,
which the driver sees as a server that went away and does not come back until it is "up".
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx2
import pytest
import sqlalchemy as sa
import trio

from lm_gateway.context import RequestContext
from lm_gateway.observability.loggers import BaseLogger, LoggerRunner, default_entry
from lm_gateway.observability.writers import SQLLogWriter
from tests.conftest import RunningGateway, run_gateway
from tests.postgres_support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    pg_table_fixture,  # noqa: F401 - a fixture, found by name
    postgres_url_fixture,  # noqa: F401 - a fixture, found by name
)

KEY = "sk-test"
GUARD = 30
INDEXED = {"created_at", "api_key_id", "model"}


# -- helpers ----------------------------------------------------------------------------------


def full_context(request_id: str = "req-full-1") -> RequestContext:
    """A finished request with every field default_entry reads set to something non-empty."""
    return RequestContext(
        id=request_id,
        endpoint="chat.completions",
        method="POST",
        path="/v1/chat/completions",
        remote_addr="127.0.0.1",
        created_at=dt.datetime(2024, 5, 1, 10, 30, 15, 123456, tzinfo=dt.UTC),
        request={"model": "gpt-4o", "messages": [{"role": "user", "content": "héllo"}]},
        model="gpt-4o",
        connection="up",
        upstream_model="gpt-4o-2024-08-06",
        group="default",
        api_key_id="key-1234abcd",
        user_info={"team": "ml", "tags": ["a", "b"], "quota": 3},
        extra={"trace_id": "t-1", "nested": {"k": [1, 2]}},
        response={"id": "chatcmpl-1", "choices": [{"message": {"content": "hi"}}]},
        stream=True,
        status=200,
        outcome="ok",
        error_type="none_really",
        error_code="E0",
        usage={
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "total_tokens": 18,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
        finish_reasons=["stop"],
        duration=1.25,
        time_to_first_chunk=0.125,
        attempts=2,
        cost=0.00042,
    )


def read_rows(engine: sa.Engine, table: str) -> list[dict[str, Any]]:
    reflected = sa.Table(table, sa.MetaData(), autoload_with=engine)
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(sa.select(reflected))]


def indexed_columns(engine: sa.Engine, table: str) -> set[str]:
    """Columns that have a single-column index of their own."""
    indexes = sa.inspect(engine).get_indexes(table)
    return {
        name
        for ix in indexes
        if len(ix["column_names"]) == 1 and (name := ix["column_names"][0]) is not None
    }


def assert_table_created(engine: sa.Engine, table: str) -> None:
    inspector = sa.inspect(engine)
    assert inspector.has_table(table)
    columns = {c["name"] for c in inspector.get_columns(table)}
    assert {"id", "created_at", "model", "api_key_id", "extra", "prompt", "response"} <= columns
    assert inspector.get_pk_constraint(table)["constrained_columns"] == ["id"]
    assert indexed_columns(engine, table) >= INDEXED


def id_counts(db_url: str, table: str) -> Counter[str]:
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        reflected = sa.Table(table, sa.MetaData(), autoload_with=engine)
        with engine.connect() as connection:
            return Counter(row[0] for row in connection.execute(sa.select(reflected.c.id)))
    finally:
        engine.dispose()


def sql_logger_config(
    db_url: str, table: str, engine_kwargs: dict[str, Any] | None = None, **logger: Any
) -> dict[str, Any]:
    writer: dict[str, Any] = {"class": "SQLLogWriter", "db_url": db_url, "table_name": table}
    if engine_kwargs is not None:
        writer["engine_kwargs"] = engine_kwargs
    return {
        "connections": {"echo": {"api_type": "echo"}},
        "routing": {"*": "echo.*"},
        "groups": {"default": {"api_keys": [KEY]}},
        "loggers": [
            {
                "class": "BaseLogger",
                "log_writer": writer,
                **logger,
            }
        ],
    }


async def send_chats(
    http: httpx2.AsyncClient, gateway: RunningGateway, count: int, tag: str
) -> list[str]:
    """``count`` concurrent chat requests; every one must succeed. Returns their request ids."""
    ids: list[str] = []

    async def one(i: int) -> None:
        response = await http.post(
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": f"m-{tag}", "messages": [{"role": "user", "content": f"{tag} {i}"}]},
        )
        assert response.status_code == 200, response.text
        ids.append(response.headers["x-request-id"])

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    assert len(set(ids)) == count
    return ids


def http_client() -> httpx2.AsyncClient:
    return httpx2.AsyncClient(timeout=GUARD, trust_env=False)


def sql_runner(gateway: RunningGateway) -> LoggerRunner:
    runner = gateway.app.gateway.loggers[0]
    assert isinstance(runner.logger, BaseLogger)
    assert isinstance(runner.logger.log_writer, SQLLogWriter)
    return runner


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = GUARD) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    pytest.fail(f"waited {timeout:g} s for {what}")


# -- SQLite -----------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'logs.db'}"


def test_sqlite_table_created_with_indexes(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    assert not sa.inspect(engine).has_table("usage_log")
    writer = SQLLogWriter(sqlite_url, table_name="usage_log")
    try:
        writer.write([default_entry(full_context())])
        assert_table_created(engine, "usage_log")
        # A second writer on the existing table (a gateway restart) finds it and appends.
        SQLLogWriter(sqlite_url, table_name="usage_log").write(
            [default_entry(full_context("req-full-2"))]
        )
        assert sorted(r["id"] for r in read_rows(engine, "usage_log")) == [
            "req-full-1",
            "req-full-2",
        ]
    finally:
        writer.close()
        engine.dispose()


def test_sqlite_every_default_entry_field_lands_in_its_column(sqlite_url: str) -> None:
    entry = default_entry(full_context(), include_prompt=True, include_response=True)
    entry["custom_field"] = {"deep": [1, {"x": None}]}  # a transformer's own field
    writer = SQLLogWriter(sqlite_url)
    try:
        writer.write([entry])
        columns = {c.name for c in writer.table.columns}
    finally:
        writer.close()
    engine = sa.create_engine(sqlite_url)
    try:
        (row,) = read_rows(engine, "llm_requests")
    finally:
        engine.dispose()

    # Every field of the standard entry has a column, except finish_reasons (kept in extra).
    assert set(entry) - columns == {"finish_reasons", "custom_field"}
    for key, value in entry.items():
        if key in ("extra", "created_at") or key not in columns:
            continue
        assert row[key] == value, key
    # Spot checks that prove the context made it through default_entry into the row.
    assert row["prompt_tokens"] == 11
    assert row["cached_tokens"] == 4
    assert row["reasoning_tokens"] == 2
    assert row["stream"] is True
    assert row["user_info"] == {"team": "ml", "tags": ["a", "b"], "quota": 3}
    assert row["prompt"] == [{"role": "user", "content": "héllo"}]
    assert row["response"] == {"id": "chatcmpl-1", "choices": [{"message": {"content": "hi"}}]}
    # Nothing lost: the context's extra and every field without a column are in ``extra``.
    assert row["extra"] == {
        "trace_id": "t-1",
        "nested": {"k": [1, 2]},
        "finish_reasons": ["stop"],
        "custom_field": {"deep": [1, {"x": None}]},
    }


def test_sqlite_unknown_fields_only_go_to_extra(sqlite_url: str) -> None:
    """A transformer's entry with no standard fields but ``id``: the rest is all in extra."""
    writer = SQLLogWriter(sqlite_url)
    try:
        writer.write(
            [
                {"id": "t1", "tokens": 5, "who": {"name": "x"}, "when": "yesterday"},
                {"id": "t2", "extra": "not a dict", "model": "m"},
                {"id": "t3"},
            ]
        )
    finally:
        writer.close()
    engine = sa.create_engine(sqlite_url)
    try:
        rows = {r["id"]: r for r in read_rows(engine, "llm_requests")}
    finally:
        engine.dispose()
    assert rows["t1"]["extra"] == {"tokens": 5, "who": {"name": "x"}, "when": "yesterday"}
    assert rows["t1"]["model"] is None
    assert rows["t1"]["created_at"] is not None  # filled in: the column is NOT NULL
    assert rows["t2"]["extra"] == {"extra": "not a dict"}
    assert rows["t2"]["model"] == "m"
    assert rows["t3"]["extra"] is None


def test_sqlite_retried_batch_does_not_duplicate_rows(sqlite_url: str) -> None:
    batch = [default_entry(full_context(f"req-{i}")) for i in range(5)]
    writer = SQLLogWriter(sqlite_url)
    try:
        writer.write(batch)
        # The runner's retry of a batch whose commit went through but whose answer was lost:
        writer.write(batch)
        # ...and a batch that overlaps the first one only partly keeps its new rows.
        writer.write([*batch[3:], default_entry(full_context("req-5"))])
    finally:
        writer.close()
    counts = id_counts(sqlite_url, "llm_requests")
    assert counts == Counter({f"req-{i}": 1 for i in range(6)})


def test_sqlite_created_at_iso_string_is_a_timestamp(sqlite_url: str) -> None:
    """The standard entry's created_at (UTC, ISO) comes back as that instant."""
    entry = default_entry(full_context())
    assert entry["created_at"] == "2024-05-01T10:30:15.123456+00:00"
    writer = SQLLogWriter(sqlite_url)
    try:
        writer.write([entry])
    finally:
        writer.close()
    engine = sa.create_engine(sqlite_url)
    try:
        (row,) = read_rows(engine, "llm_requests")
    finally:
        engine.dispose()
    stored = row["created_at"]
    assert isinstance(stored, dt.datetime)
    # SQLite has no time zones: SQLAlchemy gives back a naive value; it must be UTC.
    assert stored.replace(tzinfo=stored.tzinfo or dt.UTC) == dt.datetime(
        2024, 5, 1, 10, 30, 15, 123456, tzinfo=dt.UTC
    )


def test_sqlite_created_at_with_an_offset_is_stored_as_its_utc_instant(sqlite_url: str) -> None:
    writer = SQLLogWriter(sqlite_url)
    try:
        writer.write([{"id": "tz", "created_at": "2024-05-01T12:00:00+02:00"}])
    finally:
        writer.close()
    engine = sa.create_engine(sqlite_url)
    try:
        (row,) = read_rows(engine, "llm_requests")
    finally:
        engine.dispose()
    stored = row["created_at"]
    assert stored.replace(tzinfo=stored.tzinfo or dt.UTC) == dt.datetime(
        2024, 5, 1, 10, 0, tzinfo=dt.UTC
    )


# -- PostgreSQL: the writer alone -------------------------------------------------------------


def test_postgres_table_created_with_indexes(postgres_url: str, pg_table: str) -> None:
    engine = sa.create_engine(postgres_url, poolclass=sa.NullPool)
    assert not sa.inspect(engine).has_table(pg_table)
    writer = SQLLogWriter(postgres_url, table_name=pg_table)
    try:
        writer.write([default_entry(full_context())])
        assert_table_created(engine, pg_table)
        column_types = {c["name"]: c["type"] for c in sa.inspect(engine).get_columns(pg_table)}
        for name in ("user_info", "prompt", "response", "extra"):
            assert type(column_types[name]).__name__ == "JSONB", name
        created = column_types["created_at"]
        assert isinstance(created, sa.DateTime) and created.timezone  # timestamptz
    finally:
        writer.close()
        engine.dispose()


def test_postgres_json_columns_round_trip(postgres_url: str, pg_table: str) -> None:
    entry = default_entry(full_context(), include_prompt=True, include_response=True)
    entry["user_info"] = {"unicode": "ünï ✓", "n": 1.5, "none": None, "list": [True, {"a": []}]}
    writer = SQLLogWriter(postgres_url, table_name=pg_table)
    try:
        writer.write([entry])
        writer.write([entry])  # a retry: still one row
    finally:
        writer.close()
    engine = sa.create_engine(postgres_url, poolclass=sa.NullPool)
    try:
        (row,) = read_rows(engine, pg_table)
        with engine.connect() as connection:
            # Stored as JSONB objects (queryable), not as JSON strings.
            team = connection.execute(
                sa.text(f"SELECT user_info->>'unicode', extra->'nested'->'k'->>1 FROM {pg_table}")
            ).one()
    finally:
        engine.dispose()
    assert row["user_info"] == entry["user_info"]
    assert row["prompt"] == [{"role": "user", "content": "héllo"}]
    assert row["response"] == {"id": "chatcmpl-1", "choices": [{"message": {"content": "hi"}}]}
    assert row["extra"] == {"trace_id": "t-1", "nested": {"k": [1, 2]}, "finish_reasons": ["stop"]}
    assert tuple(team) == ("ünï ✓", "2")
    # timestamptz: an aware value, the same instant the ISO string named.
    assert row["created_at"].tzinfo is not None
    assert row["created_at"] == dt.datetime(2024, 5, 1, 10, 30, 15, 123456, tzinfo=dt.UTC)


def test_postgres_created_at_with_an_offset_keeps_its_instant(
    postgres_url: str, pg_table: str
) -> None:
    writer = SQLLogWriter(postgres_url, table_name=pg_table)
    try:
        writer.write([{"id": "tz", "created_at": "2024-05-01T12:00:00+02:00"}])
    finally:
        writer.close()
    engine = sa.create_engine(postgres_url, poolclass=sa.NullPool)
    try:
        (row,) = read_rows(engine, pg_table)
    finally:
        engine.dispose()
    assert row["created_at"].tzinfo is not None
    assert row["created_at"] == dt.datetime(2024, 5, 1, 10, 0, tzinfo=dt.UTC)


# -- PostgreSQL: through a real gateway -------------------------------------------------------


async def test_postgres_burst_through_the_gateway_logs_every_request_once(
    postgres_url: str, pg_table: str
) -> None:
    count = 300
    with trio.fail_after(GUARD * 2):
        async with run_gateway(sql_logger_config(postgres_url, pg_table)) as gateway:
            runner = sql_runner(gateway)
            async with http_client() as http:
                ids = await send_chats(http, gateway, count, "burst")
        # Left run_gateway at once: the shutdown flush wrote whatever was still queued.
    assert runner.dropped == 0
    assert runner.written == count
    counts = id_counts(postgres_url, pg_table)
    assert set(counts) == set(ids)
    assert all(n == 1 for n in counts.values()), counts.most_common(3)


@attrs.define(eq=False)
class FlakyProxy:
    """A loopback TCP proxy to ``target``; :meth:`down` cuts it off, :meth:`up` restores it.

    While down, every connection it carries is closed and new ones are closed as soon as they
    are accepted (what a client sees when a database server restarts).
    """

    target: tuple[str, int]
    port: int = 0
    is_up: bool = True
    refused: int = 0
    carried: int = 0
    _scopes: set[trio.CancelScope] = attrs.field(factory=set)

    def down(self) -> None:
        self.is_up = False
        for scope in list(self._scopes):
            scope.cancel()

    def up(self) -> None:
        self.is_up = True

    async def _handle(self, client: trio.SocketStream) -> None:
        if not self.is_up:
            self.refused += 1
            await trio.aclose_forcefully(client)
            return
        scope = trio.CancelScope()
        self._scopes.add(scope)
        self.carried += 1
        try:
            with scope:
                server = await trio.open_tcp_stream(*self.target)
                async with server, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                    nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
        finally:
            self._scopes.discard(scope)
            await trio.aclose_forcefully(client)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()  # either side closed: close both

    @classmethod
    @asynccontextmanager
    async def open(cls, host: str, port: int) -> AsyncIterator[FlakyProxy]:
        proxy = cls(target=(host, port))
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1")
            )
            proxy.port = listeners[0].socket.getsockname()[1]
            try:
                yield proxy
            finally:
                nursery.cancel_scope.cancel()

    def url(self, postgres_url: str) -> str:
        """``postgres_url`` with the proxy's port."""
        proxied = postgres_url.replace(f":{POSTGRES_PORT}/", f":{self.port}/")
        assert proxied != postgres_url
        return proxied


def outage_config(db_url: str, table: str) -> dict[str, Any]:
    config = sql_logger_config(db_url, table, max_retries=20, batch_size=10)
    # Longer than the default flush, so a slow backoff could not be what cuts it short.
    config["log_flush_seconds"] = GUARD
    return config


def failed_writes(caplog: pytest.LogCaptureFixture) -> int:
    return sum("writing failed" in r.getMessage() for r in caplog.records)


async def test_postgres_outage_mid_run_loses_and_duplicates_nothing(
    postgres_url: str, pg_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lm_gateway.loggers")
    batch = 25
    ids: list[str] = []
    with trio.fail_after(GUARD * 2):
        async with FlakyProxy.open(POSTGRES_HOST, POSTGRES_PORT) as proxy:
            config = outage_config(proxy.url(postgres_url), pg_table)
            async with run_gateway(config) as gateway, http_client() as http:
                runner = sql_runner(gateway)
                # Up: the writer connects through the proxy and writes.
                ids += await send_chats(http, gateway, batch, "before")
                await wait_until(lambda: runner.written == batch, "the first writes")
                assert proxy.carried >= 1

                # Down: the pooled connection is cut; the writer fails and retries.
                proxy.down()
                ids += await send_chats(http, gateway, batch, "during")
                await wait_until(lambda: failed_writes(caplog) >= 1, "a failed write")
                assert proxy.refused >= 1  # it tried to reconnect while down
                ids += await send_chats(http, gateway, batch, "still-down")
                await trio.sleep(1.5)
                assert runner.written == batch  # nothing got through while down
                assert runner.dropped == 0  # ...and nothing was given up either

                # Up again: the next retry writes the backlog; later requests follow.
                proxy.up()
                ids += await send_chats(http, gateway, batch, "after")
                await wait_until(lambda: runner.written + runner.dropped >= len(ids), "the rest")

    assert runner.dropped == 0
    assert runner.written == len(ids) == 4 * batch
    assert failed_writes(caplog) >= 2  # it retried (with backoff) at least once while down
    counts = id_counts(postgres_url, pg_table)
    assert set(counts) == set(ids)
    assert all(n == 1 for n in counts.values()), counts.most_common(3)


async def test_postgres_shutdown_flush_waits_for_a_database_that_comes_back(
    postgres_url: str, pg_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The database is away when the gateway is asked to stop and back one second later,
    well within ``log_flush_seconds``: the flush retries and writes everything."""
    caplog.set_level(logging.WARNING, logger="lm_gateway.loggers")
    batch = 10
    ids: list[str] = []

    async def restore(proxy: FlakyProxy) -> None:
        await trio.sleep(1.0)
        proxy.up()

    with trio.fail_after(GUARD * 2):
        async with (
            FlakyProxy.open(POSTGRES_HOST, POSTGRES_PORT) as proxy,
            trio.open_nursery() as nursery,
        ):
            config = outage_config(proxy.url(postgres_url), pg_table)
            async with run_gateway(config) as gateway:
                runner = sql_runner(gateway)
                async with http_client() as http:
                    ids += await send_chats(http, gateway, batch, "before")
                    await wait_until(lambda: runner.written == batch, "the first writes")
                    proxy.down()
                    ids += await send_chats(http, gateway, batch, "pending")
                    await wait_until(lambda: failed_writes(caplog) >= 1, "a failed write")
                assert runner.written == batch  # the second batch is still to be written
                nursery.start_soon(restore, proxy)
            # Left run_gateway: its shutdown should have retried until the database was back.

    assert runner.dropped == 0
    assert runner.written == len(ids)
    counts = id_counts(postgres_url, pg_table)
    assert set(counts) == set(ids)
    assert all(n == 1 for n in counts.values()), counts.most_common(3)
