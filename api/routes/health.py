import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE  # what every Prometheus reads
from sqlalchemy import func
from sqlmodel import col, select

from api.deps import PrincipalDep, RuntimeDep, get_principal
from api.models import Device

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={503: {"description": "degraded: the broker link is down, commands fail fast"}})
async def healthz(rt: RuntimeDep) -> JSONResponse:
    """200 `ok` while the API can send commands; 503 `degraded` while its broker link is down (a load
    balancer should send riders elsewhere: every unlock fails fast then). With NATS, `nats_connected` too: while
    it is false commands still work, and events wait in the outbox until NATS answers."""
    up = rt.link.is_connected
    body: dict[str, object] = {"status": "ok" if up else "degraded", "broker_connected": up}
    if rt.events.bus is not None:   # NATS away: commands still work, events wait in the outbox (api/push/nats_bus.py)
        body["nats_connected"] = rt.events.bus.connected
    return JSONResponse(body, status_code=200 if up else 503)


_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


@router.get("/metrics", response_class=Response, openapi_extra={"security": [{"bearer": []}]}, responses={
    200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "Prometheus text exposition"},
    401: {"description": "no operator token nor LATCH_METRICS_TOKEN (unless LATCH_METRICS_PUBLIC)", "content": _ERROR},
    403: {"description": "a rider's token", "content": _ERROR}})
async def prometheus_metrics(request: Request, rt: RuntimeDep) -> Response:
    """Prometheus exposition of this process (docs/observability.md). Needs an operator's token, or the
    scrape-only `LATCH_METRICS_TOKEN`; none with `LATCH_METRICS_PUBLIC=true`."""
    s = rt.settings
    if not s.metrics_public:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if not (s.metrics_token and scheme.lower() == "bearer"
                and hmac.compare_digest(token.strip().encode(), s.metrics_token.encode())):
            await get_principal(request)   # 401/403 unless an operator
    # the registry's count, once per scrape (every replica reports the same)
    rt.metrics.devices_online = await rt.db.read(lambda db: db.exec(
        select(func.count()).select_from(Device).where(col(Device.online))).one())
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE)


@router.get("/v1/metrics")
async def metrics(rt: RuntimeDep, _: PrincipalDep) -> dict[str, object]:
    """The named counters as JSON (tests and scripts read them); Prometheus: GET /metrics."""
    return {"counts": rt.metrics.snapshot(), "waiting_requests": len(rt.waiters), "event_subscribers": len(rt.events),
            "event_head": rt.events.head, "singleton_lease": rt.sweeper.lease.held,
            "client_id": rt.settings.api_client_id}
