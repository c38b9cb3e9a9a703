"""Notifications on the rider's phone page (issue 14, section 1) in Chromium: a notification arriving on
the page's stream is shown (title, body, action buttons) at 360 px; being shown reports it seen, pressing an
action reports the action (POST /v1/notifications/{id}/receipt), also when the server was away at that
moment; a data message (silent) shows nothing; axe-core finds nothing serious."""

from __future__ import annotations

import httpx
from playwright.async_api import Page, expect

from tests.pages.conftest import Served, TcpProxy, screenshot_path
from tests.pages.test_phone import axe_violations, phone, sign_up
from tests.support import eventually


async def notify(served: Served, **body) -> str:  # type: ignore[no-untyped-def]
    body = {"category": "service", "audience": {"all": True}, **body}
    async with httpx.AsyncClient(base_url=served.url, timeout=30,
                                 headers={"Authorization": f"Bearer {served.admin_token}"}) as h:
        r = await h.post("/v1/notifications", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]


async def counts(served: Served, notification_id: str) -> dict:
    async with httpx.AsyncClient(base_url=served.url, timeout=30,
                                 headers={"Authorization": f"Bearer {served.admin_token}"}) as h:
        return (await h.get(f"/v1/notifications/{notification_id}")).json()["counts"]


async def no_sideways_scroll(page: Page) -> None:
    assert await page.evaluate("() => document.scrollingElement.scrollWidth <= window.innerWidth")


async def test_a_notification_is_shown_seen_and_answered(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    context, page, errors = await phone(browser)
    try:
        await sign_up(page, served.url, "note@example.org")
        await expect(page.locator("#notices")).to_be_hidden()
        nid = await notify(served, title="Downtown closed today",
                           body="The Downtown zone is closed for a street festival until 18:00. Park bikes outside it.",
                           actions=[{"id": "ok", "label": "Got it"}, {"id": "map", "label": "Show the zone"}])
        card = page.locator(f'#notices article[data-notification="{nid}"]')
        await expect(card).to_be_visible(timeout=10_000)
        await expect(card.locator("h2")).to_have_text("Downtown closed today")
        await expect(card).to_contain_text("street festival")
        await expect(card.locator("button[data-action]")).to_have_text(["Got it", "Show the zone"])
        await no_sideways_scroll(page)
        assert await axe_violations(page) == []
        await page.screenshot(path=str(screenshot_path("phone-notification-360")), full_page=True)

        async def seen() -> bool:
            c = await counts(served, nid)
            return c["seen"] == 1 and c["delivered"] >= 1
        await eventually(seen, timeout=10, interval=0.2, what="the page reported it seen")
        # pressing an action reports it and closes the card (with the keyboard)
        await card.locator('button[data-action="ok"]').focus()
        await page.keyboard.press("Enter")
        await expect(card).to_have_count(0)
        await expect(page.locator("#notices")).to_be_hidden()

        async def answered() -> bool:
            return (await counts(served, nid))["actions"] == {"ok": 1, "map": 0}
        await eventually(answered, timeout=10, interval=0.2, what="the action reported")

        # a data message is handled silently; a notification after it is shown, alone
        silent = await notify(served, data={"refresh": "zones"})
        after = await notify(served, title="Thanks", body="Zones are up to date.")
        await expect(page.locator(f'#notices article[data-notification="{after}"]')).to_be_visible(timeout=10_000)
        await expect(page.locator("#notices article")).to_have_count(1)
        assert await page.evaluate("() => Notices.data.length") == 1
        assert (await counts(served, silent))["seen"] == 0
        # dismissing it only closes it (it was seen already)
        await page.locator(f'#notices article[data-notification="{after}"] button[data-dismiss]').click()
        await expect(page.locator("#notices")).to_be_hidden()
        assert errors == []
    finally:
        await context.close()


async def test_an_action_pressed_while_the_server_is_away_is_reported_later(
        served: Served, proxied: tuple[Served, TcpProxy], browser) -> None:  # type: ignore[no-untyped-def]
    through, proxy = proxied   # the page goes through the proxy; the test reads counts directly
    context, page, errors = await phone(browser)
    try:
        await sign_up(page, through.url, "away@example.org")
        nid = await notify(served, title="Battery swap", body="Your bike gets a new battery at the next stop.",
                           actions=[{"id": "ok", "label": "OK"}])
        card = page.locator(f'#notices article[data-notification="{nid}"]')
        await expect(card).to_be_visible(timeout=10_000)
        proxy.refusing = True
        proxy.drop()
        await card.locator('button[data-action="ok"]').click()
        await expect(card).to_have_count(0)
        await page.wait_for_function("() => Notices.delivery.failed > 0", timeout=10_000)   # it tried, and failed
        assert (await counts(served, nid))["actions"] == {"ok": 0}   # nothing got through yet
        proxy.refusing = False

        async def answered() -> bool:
            return (await counts(served, nid))["actions"] == {"ok": 1}
        await eventually(answered, timeout=20, interval=0.3, what="the action reported once the server is back")
        # one sent while the page cannot reach Latch arrives when it reconnects (its stream resumes from its
        # cursor), once
        proxy.refusing = True
        proxy.drop()
        await expect(page.locator("#offline-banner")).to_be_visible(timeout=10_000)
        missed = await notify(served, title="Back online", body="Sent while you were away.")
        await expect(page.locator(f'#notices article[data-notification="{missed}"]')).to_have_count(0)
        proxy.refusing = False
        await expect(page.locator(f'#notices article[data-notification="{missed}"]')).to_be_visible(timeout=20_000)
        await expect(page.locator("#notices article")).to_have_count(1)
        # one past its TTL is never shown, whatever brings it
        await page.evaluate("""() => Notices.show({notification_id: "old", title: "Old", body: "gone",
                                                   expires_at: Date.now() - 1000, silent: false})""")
        await expect(page.locator('#notices article[data-notification="old"]')).to_have_count(0)
        assert [e for e in errors if "Failed to fetch" not in e] == []
    finally:
        await context.close()


async def test_a_notification_sent_while_the_page_was_closed_is_shown_once_after_a_reload(
        served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    """The page keeps its stream's cursor for the tab (sessionStorage): what was sent while the page was
    closed arrives when it is opened again, once; what it had shown before is not shown again."""
    context, page, errors = await phone(browser)
    try:
        await sign_up(page, served.url, "reload@example.org")
        before = await notify(served, title="Before", body="Shown while the page was open.")
        await expect(page.locator(f'#notices article[data-notification="{before}"]')).to_be_visible(timeout=10_000)
        await page.locator(f'#notices article[data-notification="{before}"] button[data-dismiss]').click()
        await page.goto("about:blank")   # the rider leaves the page
        missed = await notify(served, title="While closed", body="Sent while the page was closed.")
        await page.goto(served.url + "/")   # and comes back, in the same tab, still logged in
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=10_000)
        await expect(page.locator(f'#notices article[data-notification="{missed}"]')).to_be_visible(timeout=10_000)
        await expect(page.locator("#notices article")).to_have_count(1)   # "Before" is not shown again
        # a stored cursor the server refuses (one it never issued) is dropped: the page goes live from now
        await page.evaluate("() => sessionStorage.setItem('latch-cursor', '999999999')")
        await page.reload()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=20_000)
        assert errors == []
    finally:
        await context.close()
