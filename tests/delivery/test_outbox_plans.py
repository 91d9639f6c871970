"""The claim and the flat flush run with one generic plan each (`Database.fast_pool` with
`custom_plans=False`). That plan is made once per connection, when the tables may be empty: it
must reach `deliveries` by index however the table grows, before and after it is analyzed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from clinicomm.delivery.outbox import _ATTEMPT_ROWS, _CLAIM, _FLAT, _claim_params
from clinicomm.delivery.records import Attempt
from clinicomm.store import fast
from clinicomm.store.db import Database
from tests.conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "postgres", reason="PostgreSQL's plans")

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _literal(value: Any) -> str:
    """`value` as an SQL literal of unknown type (the statement casts every parameter)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        items = ",".join(
            "NULL" if v is None else json.dumps(v.isoformat() if isinstance(v, datetime) else v)
            for v in value
        )
        return _literal("{" + items + "}")
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text.replace("'", "''") + "'"


class _Plans:
    """EXPLAIN of one statement prepared once on a connection of the generic pool."""

    def __init__(self, connection: Any, name: str, statement: Any, params: dict[str, Any]):
        compiled = fast._compile(statement)
        values = {**compiled.defaults, **params}
        self.connection = connection
        self.name = name
        self.sql = compiled.sql
        self.args = ", ".join(_literal(values[n]) for n in compiled.names)

    async def prepare(self) -> None:
        await self.connection.execute(f"PREPARE {self.name} AS {self.sql}")

    async def scans(self) -> list[tuple[str, str]]:
        """(node type, relation) of every scan of a table in the plan EXECUTE uses."""
        plan = await self.connection.fetchval(
            f"EXPLAIN (FORMAT JSON) EXECUTE {self.name}({self.args})"
        )
        found: list[tuple[str, str]] = []
        stack = [json.loads(plan)[0]["Plan"]]
        while stack:
            node = stack.pop()
            if "Relation Name" in node:
                found.append((node["Node Type"], node["Relation Name"]))
            stack.extend(node.get("Plans", []))
        return found


async def _fill(connection: Any, n: int) -> None:
    """`n` messages with a delivery each, one in ten queued and due."""
    await connection.execute(
        "INSERT INTO messages (id, clinic_id, category, content, meta, created_at)"
        " SELECT 'm' || g, NULL, 'GENERAL', '', '{}', now() FROM generate_series(1, $1) g",
        n,
    )
    await connection.execute(
        "INSERT INTO deliveries (id, message_id, channel, recipient, status, fair_at,"
        " next_attempt_at, created_at, updated_at, priority, chain_position,"
        " provider_attempts, attempts)"
        " SELECT 'd' || g, 'm' || g, 'email', '',"
        " CASE WHEN g % 10 = 0 THEN 'queued' ELSE 'sent' END, now(), now() - interval '1 s',"
        " now(), now(), g % 3, 0, 0, 0 FROM generate_series(1, $1) g",
        n,
    )


async def test_the_claim_and_the_flat_flush_reach_deliveries_by_index_however_it_grows(
    db: Database,
) -> None:
    pool = await db.fast_pool(custom_plans=False)
    async with pool.acquire() as connection:
        claim = _Plans(
            connection,
            "claim_plan",
            _CLAIM,
            _claim_params("w", 100, NOW, timedelta(seconds=60), 10, 100),
        )
        flush = _Plans(
            connection,
            "flush_plan",
            _FLAT,
            {
                "owner": "w",
                "now": NOW,
                **_ATTEMPT_ROWS.params(
                    [Attempt("d1", "clinic:sendgrid", "sent", None, 202, None, None, 3, NOW).row()],
                    db.engine.dialect,
                ),
                "o_id": ["d1", "d2"],
                "o_status": ["sent", "sent"],
                "o_attempts": [1, 1],
                "o_position": [0, 0],
                "o_provider_attempts": [1, 1],
                "o_next": [NOW, NOW],
                "o_provider": ["clinic:sendgrid", "clinic:sendgrid"],
                "o_pmid": ["p1", "p2"],
                "o_error": [None, None],
                "o_sent": [NOW, NOW],
            },
        )
        for statement in (claim, flush):
            await statement.prepare()
        seen: dict[str, list[tuple[str, str]]] = {}
        # Planned on empty tables, then after they grew (not analyzed: the same plan), then
        # after ANALYZE (which invalidates it: planned again, with real statistics).
        for stage in ("empty", "grown", "analyzed"):
            if stage == "grown":
                await _fill(connection, 20_000)
            if stage == "analyzed":
                await connection.execute("ANALYZE messages, deliveries, delivery_attempts")
            for statement in (claim, flush):
                scans = await statement.scans()
                seen[f"{statement.name} {stage}"] = scans
                assert ("Seq Scan", "deliveries") not in scans, (statement.name, stage, scans)
        assert any(
            relation == "deliveries" and node.startswith("Index")
            for node, relation in seen["claim_plan grown"]
        ), seen
