"""The operator dashboard in Chromium against `latch serve`: fleet counts, the live feed, the command
log with latency, and a device's detail."""

from __future__ import annotations

import httpx
from playwright.async_api import expect

from tests.pages.conftest import Served, screenshot_path


async def test_dashboard_shows_the_fleet_and_a_live_feed(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        await page.goto(served.url + "/ops")
        await page.fill("#token", served.admin_token)
        await page.click("#token-btn")
        await expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
        await expect(page.locator("#stat-total")).to_have_text("5")
        await expect(page.locator("#stat-online")).to_have_text("5", timeout=10_000)
        await expect(page.locator("#stat-offline")).to_have_text("0")
        async with httpx.AsyncClient(base_url=served.url, timeout=30,
                                     headers={"Authorization": f"Bearer {served.admin_token}"}) as h:
            r = await h.post("/v1/devices/bike-0003/commands", params={"wait": 5}, json={"action": "locate"})
            assert r.json()["status"] == "succeeded"
            command_id = r.json()["id"]
        # the live feed shows the command's steps as they happen, newest first
        feed = page.locator("#feed li[data-kind=command]")
        await expect(feed.first).to_contain_text("bike-0003 locate → succeeded", timeout=10_000)
        assert await feed.count() >= 4
        row = page.locator(f'#commands tr[data-command="{command_id}"]')
        await expect(row).to_contain_text("succeeded")
        await expect(row.locator("td").nth(4)).to_have_text(__import__("re").compile(r"^\d+ ms$"))
        await page.click('#devices tr[data-device="bike-0003"]')
        await expect(page.locator("#detail-id")).to_have_text("bike-0003")
        await expect(page.locator("#detail-commands tr").first).to_contain_text("locate")
        await page.screenshot(path=str(screenshot_path("ops-dashboard")), full_page=True)
        assert errors == []
    finally:
        await context.close()


async def test_a_rider_cannot_use_the_dashboard(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=served.url) as h:
        r = await h.post("/v1/auth/signup", json={"email": "r@example.org", "password": "long password"})
        assert r.status_code == 201
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await page.goto(served.url + "/ops")
        await page.fill("#email", "r@example.org")
        await page.fill("#password", "long password")
        await page.click("#login-btn")
        await expect(page.locator("#login-error")).to_have_text("this account is not an operator")
        await expect(page.locator("#dash")).to_be_hidden()
    finally:
        await context.close()
