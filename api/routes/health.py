from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import PrincipalDep, RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={503: {"description": "degraded: the broker link is down, commands fail fast"}})
async def healthz(rt: RuntimeDep) -> JSONResponse:
    """200 `ok` while the API can send commands; 503 `degraded` while its broker link is down (a load
    balancer should send riders elsewhere: every unlock fails fast then)."""
    up = rt.link.is_connected
    return JSONResponse({"status": "ok" if up else "degraded", "broker_connected": up},
                        status_code=200 if up else 503)


@router.get("/v1/metrics")
async def metrics(rt: RuntimeDep, _: PrincipalDep) -> dict[str, object]:
    return {"counts": rt.metrics.snapshot(), "waiting_requests": len(rt.waiters), "event_subscribers": len(rt.events),
            "event_head": rt.events.head, "singleton_lease": rt.sweeper.lease.held,
            "client_id": rt.settings.api_client_id}
