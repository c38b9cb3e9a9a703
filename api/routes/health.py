from fastapi import APIRouter

from api.deps import PrincipalDep, RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(rt: RuntimeDep) -> dict[str, object]:
    return {"status": "ok", "broker_connected": rt.link.is_connected}


@router.get("/v1/metrics")
async def metrics(rt: RuntimeDep, _: PrincipalDep) -> dict[str, object]:
    return {"counts": rt.metrics.snapshot(), "waiting_requests": len(rt.waiters), "event_subscribers": len(rt.events),
            "event_head": rt.events.head, "singleton_lease": rt.sweeper.lease.held,
            "client_id": rt.settings.api_client_id}
