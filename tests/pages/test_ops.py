"""The operator console in Chromium against `latch serve`: the overview (fleet counts, charts, live events
backfilled on load, recent commands whose latency and reason are never clipped), the device list (search,
filters, sort, pages; fast at 10,000 devices), a device's page (fields, a last seen that advances, actions,
presence, revoke), a command's page (timeline, issued by, duplicate answers marked, cancel), registering a
device, fleet rollouts (started, watched, cancelled), a server that drops, axe-core, screenshots."""

from __future__ import annotations

import re
import sqlite3
import time

import httpx
from playwright.async_api import Page, expect

from tests.pages.conftest import Served, TcpProxy, screenshot_path, sim_locks
from tests.pages.test_phone import axe_violations

DESKTOP = {"width": 1280, "height": 900}


async def console(browser, served: Served, hash_: str = ""):  # type: ignore[no-untyped-def]
    """A logged-in console page (the operator token), live."""
    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(served.url + "/ops" + hash_)
    await page.fill("#token", served.admin_token)
    await page.press("#token", "Enter")
    await expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
    return context, page, errors


def operator(served: Served) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=served.url, timeout=30, headers={"Authorization": f"Bearer {served.admin_token}"})


async def not_clipped(page: Page, selector: str) -> None:
    """Every cell of the table lies inside its scroll box: nothing cut off at the right."""
    box = await page.evaluate("""(sel) => {
        const t = document.querySelector(sel); const s = t.closest('.scroll');
        return {table: t.scrollWidth, box: s.clientWidth,
                cells: [...t.querySelectorAll('td')].map(c => c.scrollWidth - c.clientWidth)};
    }""", selector)
    assert box["table"] <= box["box"], box
    assert max(box["cells"] or [0]) <= 1, box


async def test_overview_backfill_live_feed_commands_and_charts(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    async with operator(served) as h:
        # before the page opens: a command that succeeded, one refused at once with a long reason
        first = (await h.post("/v1/devices/bike-0003/commands", params={"wait": 5}, json={"action": "locate"})).json()
        assert first["status"] == "succeeded"
        assert (await h.post("/v1/devices", json={"id": "spare-0001"})).status_code == 201
        refused = (await h.post("/v1/devices/spare-0001/commands", json={"action": "unlock"})).json()
        assert refused["status"] == "failed"
        context, page, errors = await console(browser, served)
        try:
            # backfill: the feed shows what happened before the page opened
            feed = page.locator("#feed li[data-kind=command]")
            await expect(feed.first).to_contain_text("spare-0001 unlock → failed")
            await expect(page.locator("#feed")).to_contain_text("bike-0003 locate → succeeded")
            await expect(page.locator("#stat-total")).to_have_text("6")
            await expect(page.locator("#stat-online")).to_have_text("5")
            await expect(page.locator("#stat-offline")).to_have_text("1")
            # live: a new command shows in the feed and in the table, with its latency
            r = await h.post("/v1/devices/bike-0002/commands", params={"wait": 5}, json={"action": "locate"})
            command_id = r.json()["id"]
            await expect(feed.first).to_contain_text("bike-0002 locate → succeeded", timeout=10_000)
            row = page.locator(f'#commands tr[data-command="{command_id}"]')
            await expect(row).to_contain_text("succeeded")
            await expect(row.locator("td.c-lat")).to_have_text(re.compile(r"^\d+ ms$"))
            # the refused unlock: its reason in words, in full, on a row of ordinary height
            bad = page.locator(f'#commands tr[data-command="{refused["id"]}"]')
            await expect(bad.locator("td.c-why")).to_contain_text("the lock was offline")
            await not_clipped(page, "table.cmds")
            assert (await bad.bounding_box())["height"] < 90   # type: ignore[index]
            # charts: bars for the commands, a line of devices online, each described in words
            await expect(page.locator("#chart-commands svg rect")).not_to_have_count(0)
            await expect(page.locator("#chart-commands svg")).to_have_attribute("aria-label", re.compile(r"succeeded \d"))
            await expect(page.locator("#chart-online path[data-series=online]")).to_have_count(1)
            await expect(page.locator('#chart-latency path[data-series="total p99"]')).to_have_count(1)
            await expect(page.locator("#chart-commands .legend li[data-series=failed]")).to_contain_text("failed: 1")
            assert await axe_violations(page) == []
            await page.screenshot(path=str(screenshot_path("ops-overview")), full_page=True)
            # a click on a row's time opens the command
            await row.locator("td.c-time a").click()
            await expect(page.locator("#view-command")).to_be_visible()
            assert errors == []
        finally:
            await context.close()


async def test_a_rider_cannot_use_the_console(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=served.url) as h:
        r = await h.post("/v1/auth/signup", json={"email": "r@example.org", "password": "long password"})
        assert r.status_code == 201
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await page.goto(served.url + "/ops")
        assert await axe_violations(page) == []
        await page.fill("#email", "r@example.org")
        await page.fill("#password", "long password")
        await page.click("#login-btn")
        await expect(page.locator("#login-error")).to_have_text("This account is not an operator.")
        await expect(page.locator("#dash")).to_be_hidden()
        await page.fill("#token", "not-the-token")
        await page.click("#token-btn")
        await expect(page.locator("#login-error")).to_have_text("Wrong email, password or token.")
        await page.screenshot(path=str(screenshot_path("ops-login")), full_page=True)
    finally:
        await context.close()
