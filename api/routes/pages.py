"""The phone page (/) and the operator dashboard (/ops): static HTML + vanilla JS, no build step."""

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def phone() -> FileResponse:
    return FileResponse(STATIC / "phone.html", headers={"Cache-Control": "no-cache"})


@router.get("/ops")
async def ops() -> FileResponse:
    return FileResponse(STATIC / "ops.html", headers={"Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
