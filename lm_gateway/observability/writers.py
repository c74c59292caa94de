"""Log writers: JSON lines files and SQL databases.

Writers are synchronous and may block: the logger runner calls ``write(entries)`` from a worker
thread, with a batch at a time, and retries a batch whose write raised. A writer must therefore
leave nothing half-written when it raises (the JSON writer writes a batch with one ``write``
call; the SQL writer inserts a batch in one transaction).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("lm_gateway.loggers")


def _encode(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(entry, default=_fallback, option=orjson.OPT_NON_STR_KEYS)


def _fallback(value: Any) -> Any:
    """Values orjson cannot write: pydantic models, objects, exceptions, bytes."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


class JsonLogWriter:
    """Appends entries as JSON lines to ``file_name``, rotating by size.

    Args:
        file_name: the log file (directories are created).
        max_bytes: rotate when the file would grow past this (0: never).
        backup_count: rotated files kept (``json.log.1`` is the newest).
    """

    def __init__(
        self, file_name: str, max_bytes: int = 100 * 1024 * 1024, backup_count: int = 5
    ) -> None:
        if not file_name:
            raise ValueError("file_name: must not be empty")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes: must be a whole number of bytes, got {max_bytes!r}")
        if not isinstance(backup_count, int) or backup_count < 0:
            raise ValueError(f"backup_count: must be a whole number, got {backup_count!r}")
        self.path = Path(file_name)
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self._lock = threading.Lock()

    def write(self, entries: list[dict[str, Any]]) -> None:
        data = b"".join(_encode(e) + b"\n" for e in entries)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if (
                self.max_bytes
                and self.path.exists()
                and self.path.stat().st_size + len(data) > self.max_bytes
                and self.path.stat().st_size > 0
            ):
                self._rotate()
            # One write of the whole batch, appended: a failure leaves no partial batch.
            with self.path.open("ab") as file:
                file.write(data)

    def _rotate(self) -> None:
        if self.backup_count == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backup_count - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


class SQLLogWriter:
    """Inserts entries into a SQL table through SQLAlchemy (SQLite, PostgreSQL, MySQL...).

    The table is created if missing, with indexes on ``created_at``, ``api_key_id`` and
    ``model``. Entry fields with a column of the same name go there; any others are kept in the
    ``extra`` JSON column, so nothing is lost whatever the transformer produces.

    Args:
        db_url: a SQLAlchemy URL (``sqlite:///logs.db``,
            ``postgresql+psycopg://user@host/db``, ``mysql+pymysql://...``); the driver must be
            installed.
        table_name: the table.
        engine_kwargs: passed to ``sqlalchemy.create_engine``.
    """

    def __init__(
        self,
        db_url: str,
        table_name: str = "llm_requests",
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        try:
            import sqlalchemy as sa
            from sqlalchemy.dialects import postgresql
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError(
                "the SQL log writer needs SQLAlchemy: pip install 'lm-gateway[sql]'"
            ) from exc
        if not db_url:
            raise ValueError("db_url: must not be empty")
        self.db_url = db_url
        self.table_name = table_name
        kwargs = dict(engine_kwargs or {})
        url = sa.engine.make_url(db_url)
        if url.get_backend_name() == "postgresql" and url.get_driver_name() in (
            "psycopg",
            "psycopg2",
        ):
            # libpq waits forever by default for a server that accepts and never answers;
            # a writer thread stuck there would never retry.
            kwargs.setdefault("connect_args", {}).setdefault("connect_timeout", 10)
        # pool_pre_ping: a connection the server dropped (a restart) is replaced, not used.
        self._engine = sa.create_engine(db_url, pool_pre_ping=True, **kwargs)
        metadata = sa.MetaData()
        json_type = sa.JSON(none_as_null=True).with_variant(
            postgresql.JSONB(none_as_null=True), "postgresql"
        )
        self.table = sa.Table(
            table_name,
            metadata,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
            sa.Column("duration", sa.Float),
            sa.Column("time_to_first_token", sa.Float),
            sa.Column("endpoint", sa.String(64)),
            sa.Column("status", sa.Integer),
            sa.Column("outcome", sa.String(16)),
            sa.Column("error_type", sa.String(128)),
            sa.Column("error_code", sa.String(128)),
            sa.Column("group", sa.String(255)),
            sa.Column("api_key_id", sa.String(64), index=True),
            sa.Column("user_info", json_type),
            sa.Column("remote_addr", sa.String(64)),
            sa.Column("model", sa.String(255), index=True),
            sa.Column("connection", sa.String(255)),
            sa.Column("upstream_model", sa.String(255)),
            sa.Column("attempts", sa.Integer),
            sa.Column("served_by", sa.String(255)),
            sa.Column("attempt_log", json_type),
            sa.Column("stream", sa.Boolean),
            sa.Column("prompt_tokens", sa.Integer),
            sa.Column("completion_tokens", sa.Integer),
            sa.Column("total_tokens", sa.Integer),
            sa.Column("cached_tokens", sa.Integer),
            sa.Column("reasoning_tokens", sa.Integer),
            sa.Column("cost", sa.Float),
            sa.Column("prompt", json_type),
            sa.Column("response", json_type),
            sa.Column("extra", json_type),
        )
        self._columns = {c.name for c in self.table.columns}
        self._created = False
        self._lock = threading.Lock()

    def _row(self, entry: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(self._columns)
        extra: dict[str, Any] = {}
        for key, value in entry.items():
            if key in self._columns and key != "extra":
                row[key] = value
            else:
                extra[key] = value
        if isinstance(entry.get("extra"), dict):
            extra = {**entry["extra"], **{k: v for k, v in extra.items() if k != "extra"}}
        row["extra"] = orjson.loads(_encode(extra)) if extra else None
        for key in ("user_info", "prompt", "response", "attempt_log"):
            if row.get(key) is not None:
                row[key] = orjson.loads(_encode({"v": row[key]}))["v"]
        row["created_at"] = self._created_at(row.get("created_at"), row)
        if row.get("id") is None:
            row["id"] = os.urandom(8).hex()
        return row

    @staticmethod
    def _created_at(value: Any, row: dict[str, Any]) -> dt.datetime:
        """A UTC timestamp: SQLite keeps no offset, so 12:00+02:00 must be stored as 10:00.
        A value that is no timestamp becomes "now", and is kept in ``extra``."""
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError:
                row["extra"] = {**(row["extra"] or {}), "created_at": value}
                value = None
        if not isinstance(value, dt.datetime):
            return dt.datetime.now(dt.UTC)
        if value.tzinfo is None:  # the gateway's own timestamps are UTC
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    def write(self, entries: list[dict[str, Any]]) -> None:
        with self._lock:
            if not self._created:
                self._create()
            rows = [self._row(e) for e in entries]
            # One transaction per batch: all rows or none, so a retry cannot duplicate rows...
            with self._engine.begin() as connection:
                existing = self._existing_ids(connection, [r["id"] for r in rows])
                fresh = [r for r in rows if r["id"] not in existing]
                if fresh:
                    connection.execute(self.table.insert(), fresh)

    def _create(self) -> None:
        """Create the table if missing. A table made by an earlier version may lack newer
        columns (there are no migrations): those fields then go to ``extra``."""
        import sqlalchemy as sa

        self.table.metadata.create_all(self._engine, checkfirst=True)
        present = {c["name"] for c in sa.inspect(self._engine).get_columns(self.table_name)}
        missing = self._columns - present
        if missing:
            log.warning(
                "table %s has no column %s: those fields are stored in 'extra' (add the "
                "columns to give them their own)",
                self.table_name,
                ", ".join(sorted(missing)),
            )
            self._columns -= missing
        self._created = True

    def _existing_ids(self, connection: Any, ids: list[str]) -> set[str]:
        # ...and if a commit succeeded but its answer was lost, the retry skips those rows.
        import sqlalchemy as sa

        found = connection.execute(sa.select(self.table.c.id).where(self.table.c.id.in_(ids)))
        return {row[0] for row in found}

    def close(self) -> None:
        self._engine.dispose()
