"""The rider's phone page in Chromium against `latch serve`: sign up, unlock, see it succeed, survive a
dropped connection, lock, and see the ride end."""

from __future__ import annotations

import re

import httpx
from playwright.async_api import expect

from tests.pages.conftest import Served, TcpProxy, screenshot_path

PHONE = {"width": 390, "height": 844}


async def test_rider_unlocks_rides_and_locks(proxied: tuple[Served, TcpProxy], browser) -> None:  # type: ignore[no-untyped-def]
    served, proxy = proxied
    context = await browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        await page.goto(served.url + "/")
        await page.fill("#email", "rider@example.org")
        await page.fill("#password", "correct horse battery")
        await page.click("#signup-btn")
        await expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
        unlock = page.locator('li[data-bike="bike-0001"] button.unlock')
        await expect(unlock).to_be_enabled(timeout=10_000)
        await unlock.click()
        # the command's progress, live: queued → sent → received → succeeded, and the ride turns active
        await expect(page.locator("#cmd-status")).to_have_text("succeeded", timeout=10_000)
        await expect(page.locator("#ride-status")).to_have_text("active", timeout=10_000)
        assert await page.locator("#cmd-steps li.done").count() == 4
        await expect(page.locator('li[data-bike="bike-0001"] .pill.ok', has_text="yours")).to_be_visible()
        await page.screenshot(path=str(screenshot_path("phone-riding")), full_page=True)

        # a dropped connection: the locate's progress happens while the stream is down; the stream comes
        # back by itself (Last-Event-ID) and the page catches up on what it missed
        proxy.drop()
        await expect(page.locator("#conn")).to_have_text("reconnecting", timeout=10_000)
        await page.click("#locate-btn")
        await expect(page.locator("#cmd-action")).to_have_text("locate")
        await expect(page.locator("#cmd-status")).to_have_text(re.compile("^(queued|sent)$"))   # no stream yet
        await expect(page.locator("#conn")).to_have_text("live", timeout=20_000)
        await expect(page.locator("#cmd-status")).to_have_text("succeeded", timeout=10_000)
        await page.click("#lock-btn")
        await expect(page.locator("#cmd-action")).to_have_text("lock")
        await expect(page.locator("#cmd-status")).to_have_text("succeeded", timeout=10_000)
        await expect(page.locator("#ended-text")).to_contain_text("ended: the bike was locked", timeout=10_000)
        await expect(page.locator("#ride")).to_be_hidden()
        await expect(page.locator('li[data-bike="bike-0001"] button.unlock')).to_be_enabled(timeout=10_000)
        await page.screenshot(path=str(screenshot_path("phone-ride-ended")), full_page=True)
        # nothing overflows a narrow screen
        assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        assert errors == []
    finally:
        await context.close()
    async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {served.admin_token}"}) as h:
        rides = (await h.get("/v1/rides")).json()
        assert [(r["bike_id"], r["status"], r["reason"]) for r in rides] == \
            [("bike-0001", "ended", "the bike was locked")]


async def test_refusals_are_shown_with_their_reason(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=served.url) as h:
        tokens = {}
        for who in ("first", "second", "third"):
            r = await h.post("/v1/auth/signup", json={"email": f"{who}@example.org", "password": "long password"})
            assert r.status_code == 201
            tokens[who] = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert (await h.post("/v1/rides", json={"bike_id": "bike-0002"}, headers=tokens["first"])).status_code == 201
        context = await browser.new_context(viewport=PHONE)
        page = await context.new_page()
        try:
            await page.goto(served.url + "/")
            await page.fill("#email", "second@example.org")
            await page.fill("#password", "long password")
            await page.click("#login-btn")
            unlock = page.locator('li[data-bike="bike-0003"] button.unlock')
            await expect(unlock).to_be_enabled(timeout=10_000)
            assert await page.locator('li[data-bike="bike-0002"]').count() == 0   # taken: not offered
            # someone else takes bike-0003 while it is on screen: pressing Unlock says why not
            assert (await h.post("/v1/rides", json={"bike_id": "bike-0003"}, headers=tokens["third"])).status_code == 201
            await unlock.click()
            await expect(page.locator("#bikes-error")).to_have_text("bike bike-0003 is in use by another rider")
            # a wrong password on a fresh tab says so
            page2 = await context.new_page()
            await page2.goto(served.url + "/")
            await page2.fill("#email", "second@example.org")
            await page2.fill("#password", "not the password")
            await page2.click("#login-btn")
            await expect(page2.locator("#login-error")).to_have_text("wrong email or password")
        finally:
            await context.close()
