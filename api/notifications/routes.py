"""Notifications over HTTP: operators send and read counts; riders set preferences and report receipts.
Riders receive notifications on the event transports (kind "notification"), not here."""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, status

from api.deps import CallerDep, OperatorDep, RuntimeDep
from api.errors import Forbidden
from api.notifications.models import (
    NotificationCreate,
    NotificationCreated,
    NotificationPublic,
    Prefs,
    ReceiptCreate,
    ReceiptPublic,
)
from api.notifications.service import NotificationService
from api.paging import OffsetQuery
from api.runtime import Runtime

router = APIRouter(tags=["notifications"])
IdPath = Path(min_length=1, max_length=40)


def _svc(rt: Runtime) -> NotificationService:
    svc = rt.notifications
    assert svc is not None
    return svc


@router.post("/v1/notifications", status_code=status.HTTP_201_CREATED, response_model=NotificationCreated,
             responses={400: {"description": "audience.users names someone who is not a rider"},
                        403: {"description": "operators only"},
                        422: {"description": "a malformed body: sizes, counts, category, ttl_s"}})
async def send(body: NotificationCreate, rt: RuntimeDep, who: OperatorDep) -> NotificationCreated:
    """Send one notification (title, body, up to 3 actions) or a data message (no title/body: handled
    silently by the app) to every rider, a list of riders, or the riders on a ride now. Written once;
    each rider receives it on every transport as an event of kind `notification`, subject to their
    preferences (opt-out, quiet hours) and the daily cap, while `ttl_s` lasts."""
    return await _svc(rt).send(who, body)


@router.get("/v1/notifications/{notification_id}", response_model=NotificationPublic,
            responses={403: {"description": "operators only"}, 404: {"description": "no such notification"}})
async def detail(rt: RuntimeDep, who: OperatorDep, notification_id: str = IdPath,
                 limit: int = Query(100, ge=1, le=1000), offset: OffsetQuery = 0) -> NotificationPublic:
    """The notification with its counts (audience, delivered, seen, actions pressed, held by each rule,
    expired) and a page of receipts: one row per rider who answered."""
    return await _svc(rt).detail(notification_id, limit, offset)


@router.post("/v1/notifications/{notification_id}/receipt", response_model=ReceiptPublic,
             responses={404: {"description": "no such notification for you"},
                        409: {"description": "another action was already reported"},
                        422: {"description": "not an action of this notification"}})
async def receipt(body: ReceiptCreate, rt: RuntimeDep, who: CallerDep,
                  notification_id: str = IdPath) -> ReceiptPublic:
    """Report that the notification was shown (`{"seen": true}`) or which action was pressed
    (`{"action": "<id>"}`, which also means seen). Repeating a report changes nothing."""
    if who.is_operator:
        raise Forbidden("receipts come from the riders it was sent to")
    return await _svc(rt).receipt(who, notification_id, body)


@router.get("/v1/me/notification-prefs", response_model=Prefs)
async def get_prefs(rt: RuntimeDep, who: CallerDep) -> Prefs:
    """Your delivery preferences (defaults when never set: nothing opted out, no quiet hours, UTC)."""
    return await _svc(rt).get_prefs(who)


@router.put("/v1/me/notification-prefs", response_model=Prefs,
            responses={422: {"description": "transactional opted out, a bad time or time zone"}})
async def put_prefs(body: Prefs, rt: RuntimeDep, who: CallerDep) -> Prefs:
    """Replace your preferences: `opt_out` (service, marketing; transactional cannot be opted out of),
    `quiet_hours` {start, end} in local time (marketing is held until they end), `timezone` (IANA)."""
    return await _svc(rt).put_prefs(who, body)
