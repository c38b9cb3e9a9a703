"""How list endpoints page: `limit` plus a bounded `offset`.

An offset is bounded (MAX_OFFSET) because the database walks every skipped row — a rider asking
for offset 2**63 used to overflow SQLite's integer (500), and an offset in the millions is a cheap
way to make the database scan. Lists are newest first, so the pages anyone reads are the first ones;
an export of everything goes through the database, not the paging API.
"""

from typing import Annotated

from fastapi import Query

MAX_OFFSET = 100_000

OffsetQuery = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=f"rows to skip, at most {MAX_OFFSET}")]
