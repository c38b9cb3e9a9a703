"""/docs in Chromium: Swagger UI from Latch's own assets renders under its Content-Security-Policy, with no
request leaving the API's origin (issue 12, defect 12)."""

from __future__ import annotations

from playwright.async_api import expect

from tests.pages.conftest import Served, screenshot_path


async def test_docs_render_offline_under_the_csp(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    console: list[str] = []
    elsewhere: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith(served.url) else None)
    try:
        await page.goto(served.url + "/docs")
        await expect(page.locator(".swagger-ui .info .title")).to_contain_text("Latch", timeout=15_000)
        await expect(page.locator(".opblock-summary-path", has_text="/v1/devices/{device_id}/commands").first
                     ).to_be_visible()
        await page.screenshot(path=str(screenshot_path("docs")))
        assert not [c for c in console if "Content Security Policy" in c], console
        assert not [u for u in elsewhere if not u.startswith("data:")], elsewhere
    finally:
        await context.close()
