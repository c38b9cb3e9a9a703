"""The event log over HTTP: short polling, long polling (`wait`) and Server-Sent Events."""

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status

from api.auth import Principal
from api.deps import CallerDep, RuntimeDep, StreamCallerDep
from api.push.event_models import EventPage
from api.push.events import CursorError, EventLog, LiveEvent
from api.push.sse import EventStream
from api.runtime import Runtime

router = APIRouter(tags=["events"])

AfterQuery = Annotated[str | None, Query(description="cursor: the id of the last event you have (0: from the "
                                                     "beginning)", max_length=40)]


async def cursor_or_400(log: EventLog, raw: str | None) -> int | None:
    try:
        return await log.check_cursor(raw)
    except CursorError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e))


def page_body(events: list[LiveEvent], cursor: int) -> bytes:
    return b'{"events":[' + b",".join(ev.json for ev in events) + b'],"cursor":%d}' % cursor


async def poll(rt: Runtime, who: Principal, after: int, wait: float, limit: int) -> tuple[list[LiveEvent], int]:
    """Events after `after` the caller may see; with `wait`, hold until there is one or the wait ends."""
    log = rt.events
    sub = log.open(who, after)
    try:
        events: list[LiveEvent] = []
        for _ in range(3):   # a page from the database, at most once more from memory; then live
            events = await log.backlog(sub, limit)
            if events or sub.live or sub.closed:
                break
        if not events and wait > 0 and sub.live:
            events = (await sub.next(min(wait, rt.settings.max_wait_s)))[:limit]
    finally:
        sub.close("answered")
    return events, events[-1].id if events else after


@router.get("/v1/events", response_model=EventPage,
            responses={400: {"description": "the cursor is not an event id, or is from the future"}})
async def list_events(rt: RuntimeDep, who: CallerDep, after: AfterQuery = None,
                      wait: float = Query(0, ge=0, le=60, description="long polling: hold the request up to this "
                                                                         "many seconds until there is an event"),
                      limit: int = Query(100, ge=1, le=1000)) -> Response:
    """Short polling (no `wait`): the events after `after`, at once. Long polling (`wait`): the same, but
    held until there is at least one or the wait ends (then `events` is empty and `cursor` unchanged).
    Continue with `after=<cursor>`. Riders see their own events; operators see all."""
    start = await cursor_or_400(rt.events, after) or 0
    events, cursor = await poll(rt, who, start, wait, limit)
    return Response(page_body(events, cursor), media_type="application/json")


# explicit: FastAPI cannot infer it from EventStream
@router.get("/v1/events/stream", response_class=EventStream, status_code=200,
            responses={200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
                       400: {"description": "bad cursor"}, 401: {"description": "bad or expired token"}})
async def stream(request: Request, rt: RuntimeDep, who: StreamCallerDep, after: AfterQuery = None,
                 last_event_id_q: Annotated[str | None, Query(alias="last_event_id", max_length=40)] = None,
                 last_event_id: Annotated[str | None, Header(max_length=40)] = None) -> EventStream:
    """Server-Sent Events: every event as `id:` (the cursor), `event:` (its kind) and `data:` (JSON).
    Resume with the `Last-Event-ID` header (browsers send it when they reconnect) or `?last_event_id=`
    / `?after=`; with none, the stream starts at the newest event. Browsers authenticate with a stream
    token in `?token=` (POST /v1/auth/stream-token)."""
    raw = last_event_id if last_event_id not in (None, "") else (last_event_id_q if last_event_id_q else after)
    cursor = await cursor_or_400(rt.events, raw)
    return EventStream(rt.events, rt.events.open(who, cursor), rt.settings.sse_keepalive_s)
