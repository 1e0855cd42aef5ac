"""The history explorer in a real browser (Debian's Chromium, driven by Playwright) against the
real service, fed with Svix-signed webhooks.

Playwright's async API: its sync API runs an event loop of its own, which the database
fixtures' asyncio.run cannot share.
Screenshots land in test-artifacts/explorer/ (git-ignored).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from mirror.db import init_connection
from tests.conftest import API_TOKEN
from tests.e2e.browser import ARTIFACTS, LAUNCH_ARGS, ensure_chromium
from tests.e2e.harness import Service, wait_projected
from tests.logtools import append
from tests.signing import envelope, signed

pytestmark = pytest.mark.timeout(600)
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="session")
def chromium() -> str:
    return str(ensure_chromium())


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport=DESKTOP, timezone_id="UTC", locale="en-GB")
    # The page must never reach beyond the mirror: any other host fails the test.
    outside: list[str] = []

    async def watch(route: Route) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1:", "data:")):
            await route.continue_()
        else:
            outside.append(url)
            await route.abort()

    await context.route("**/*", watch)
    opened = await context.new_page()
    yield opened
    await context.close()
    assert outside == []


def post(service: Service, event: dict[str, Any]) -> dict[str, Any]:
    body, headers = signed(event)
    request = urllib.request.Request(f"{service.url}/webhooks", data=body, method="POST",
                                     headers={**headers, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
        result: dict[str, Any] = json.loads(answer.read())
        return result


def order(status: str, minute: int, previous: dict[str, Any] | None = None,
          order_id: str = "ord_1234", number: str = "#1234") -> dict[str, Any]:
    return envelope("order.updated" if previous else "order.created",
                    {"id": order_id, "order_number": number, "status": status,
                     "updated_date": f"2025-05-01T10:{minute:02d}:00Z",
                     "line_items": [{"sku": "SKU-RED", "quantity": 2}]}, previous=previous)


async def feed(service: Service, db_url: str) -> datetime:
    """Signed webhooks: order #1234 created (open, 10:00), then updated (shipped, 10:09) with
    previous_attributes revealing a 'picked' state at 10:05 whose own webhook never came; other
    orders, an inventory item and an event that cannot be projected. Returns a time between
    the order's two deliveries."""
    post(service, order("open", 0))
    for n in range(3):
        post(service, order("open", n, order_id=f"ord_other_{n}", number=f"#9{n}"))
    post(service, envelope("inventory.created", {"id": "inv_1", "sku": "SKU-RED", "onhand": 5,
                                                 "updated_date": "2025-05-01T09:00:00Z"}))
    post(service, envelope("order.teleported", {"id": "ord_x"}))
    await wait_projected(db_url)
    between = datetime.now(UTC)
    post(service, order("shipped", 9, {"status": "picked",
                                       "updated_date": "2025-05-01T10:05:00Z"}))
    await wait_projected(db_url)
    return between


async def log_in(page: Page, service: Service, token: str = API_TOKEN) -> None:
    await page.goto(f"{service.url}/ui/")
    await expect(page.get_by_label("API token", exact=True)).to_be_focused()
    await page.keyboard.type(token)
    await page.keyboard.press("Enter")


async def no_horizontal_scroll(page: Page) -> bool:
    return bool(await page.evaluate(
        "document.documentElement.scrollWidth <= window.innerWidth + 1"))


async def test_explorer_finds_an_order_shows_its_timeline_and_travels_in_time(
        start_service: Callable[..., Service], db_url: str, page: Page) -> None:
    service = start_service()
    between = await feed(service, db_url)

    # A wrong token is refused with a clear message, and the page asks again.
    await log_in(page, service, "not-the-token")
    message = page.locator("#login-message")
    await expect(message).to_contain_text("refused that token")
    await expect(message).to_contain_text("MIRROR_API_TOKEN")
    await page.screenshot(path=ARTIFACTS / "wrong-token.png")
    assert await page.evaluate("sessionStorage.length") == 0

    # The right token; then find the order by its number, from the keyboard only.
    await page.get_by_label("API token", exact=True).fill(API_TOKEN)
    await page.keyboard.press("Enter")
    search = page.get_by_label("Id, order number or SKU")
    await expect(search).to_be_focused()
    await page.keyboard.type("#1234")
    await page.keyboard.press("Enter")
    first = page.locator("#results a").first
    await expect(first).to_contain_text("ord_1234")
    await expect(first).to_be_focused()
    await page.screenshot(path=ARTIFACTS / "search.png")
    await page.keyboard.press("Enter")

    # The timeline: three versions, newest first; the one revealed by previous_attributes
    # is marked derived and shows its change as old → new; the missed webhook is flagged.
    versions = page.locator("#versions li.version")
    await expect(versions).to_have_count(3)
    await expect(versions.nth(0)).to_have_attribute("data-kind", "received")
    derived = versions.nth(1)
    await expect(derived).to_have_attribute("data-kind", "derived")
    await expect(derived.locator(".badge")).to_have_text("derived")
    await expect(derived.locator("time")).to_have_text("2025-05-01 10:05:00Z")
    status_change = derived.locator(".diff li", has_text="status")
    await expect(status_change).to_contain_text('"open" → "picked"')
    await expect(versions.nth(0).locator(".diff li", has_text="status")).to_contain_text(
        '"picked" → "shipped"')
    await expect(versions.nth(0)).to_contain_text("order.updated")
    missed = page.locator("#versions li.anomaly[data-kind='missed_webhook']")
    await expect(missed).to_have_count(1)
    await expect(missed).to_contain_text("paths: status, updated_date")
    await expect(page.locator("#more")).to_have_text("")  # one page: nothing more to load
    await expect(page.locator("#state-status")).to_have_text("shipped")

    # As of 10:06 the order was picked; known at a time before the update arrived, the
    # mirror still thought it open.
    await page.get_by_label("As of").fill("2025-05-01T10:06:00Z")
    await page.keyboard.press("Enter")
    await expect(page.locator("#state-status")).to_have_text("picked")
    await expect(derived).to_have_class("version derived current")
    assert "at=2025-05-01T10%3A06%3A00Z" in page.url
    await page.screenshot(path=ARTIFACTS / "object.png", full_page=True)
    await page.get_by_label("Known at").fill(between.isoformat())
    await page.keyboard.press("Enter")
    await expect(page.locator("#state-status")).to_have_text("open")
    await page.get_by_label("Known at").fill("")
    await page.keyboard.press("Enter")
    await expect(page.locator("#state-status")).to_have_text("picked")

    # Keys [ and ] step through the versions.
    await page.locator("#state-title").click()
    await page.keyboard.press("[")
    await expect(page.locator("#state-status")).to_have_text("open")
    await page.keyboard.press("]")
    await page.keyboard.press("]")
    await expect(page.locator("#state-status")).to_have_text("shipped")

    # A deep link carries resource, id and time (never the token) and survives a reload.
    deep = page.url
    assert API_TOKEN not in deep and "token" not in deep.lower()
    assert "resource=order" in deep and "id=ord_1234" in deep and "at=" in deep
    await page.reload()
    await expect(page.locator("#state-status")).to_have_text("shipped")
    await expect(page.get_by_label("As of")).to_have_value("2025-05-01T10:09:00+00:00")

    # Phone width: one column, nothing wider than the screen.
    await page.set_viewport_size(PHONE)
    await page.goto(f"{service.url}/ui/#/object?resource=order&id=ord_1234&at=2025-05-01T10%3A06%3A00Z")
    await expect(page.locator("#state-status")).to_have_text("picked")
    assert await no_horizontal_scroll(page)
    await page.screenshot(path=ARTIFACTS / "object-phone.png", full_page=True)
    await page.set_viewport_size(DESKTOP)

    # The overview: figures, the open anomaly linked to its object; it refreshes itself.
    await page.get_by_role("link", name="Overview").click()
    await expect(page.locator("#log-events")).to_have_text("7")
    await expect(page.locator("#card-unprojectable")).to_contain_text("order.teleported")
    await expect(page.locator("#ingest-total")).to_have_text("7")
    anomaly = page.locator("#card-anomalies a", has_text="ord_1234")
    await expect(anomaly).to_contain_text("missed_webhook")
    await page.screenshot(path=ARTIFACTS / "overview.png", full_page=True)
    post(service, order("open", 1, order_id="ord_late", number="#77"))
    await expect(page.locator("#log-events")).to_have_text("8", timeout=20_000)
    await expect(page.locator("#ingest-total")).to_have_text("8")
    await page.set_viewport_size(PHONE)
    assert await no_horizontal_scroll(page)
    await page.screenshot(path=ARTIFACTS / "overview-phone.png", full_page=True)
    await page.set_viewport_size(DESKTOP)

    # Following the anomaly's link opens the order at the anomaly's instant.
    await anomaly.focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#versions li.anomaly.current")).to_have_count(1)
    await expect(page.locator("#state-status")).to_have_text("picked")
    assert "id=ord_1234" in page.url and "at=2025-05-01T10%3A05%3A00" in page.url

    # The token lives in this tab's session only, and never in a URL the page requested.
    assert await page.evaluate("sessionStorage.getItem('mirror.apiToken')") == API_TOKEN
    assert await page.evaluate("localStorage.length") == 0
    await page.get_by_role("button", name="Forget token").click()
    await expect(page.get_by_label("API token", exact=True)).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0


async def test_a_token_refused_later_sends_the_reader_back_to_the_token_form(
        start_service: Callable[..., Service], db_url: str, page: Page) -> None:
    service = start_service()
    post(service, order("open", 0))
    await wait_projected(db_url)
    await page.goto(f"{service.url}/ui/#/object?resource=order&id=ord_1234")
    await expect(page.get_by_label("API token", exact=True)).to_be_visible()
    # A token that was right once (the service restarted with another one, say).
    await page.evaluate("sessionStorage.setItem('mirror.apiToken', 'stale-token')")
    await page.reload()
    await expect(page.locator("#login-message")).to_contain_text("refused that token")
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await page.get_by_label("API token", exact=True).fill(API_TOKEN)
    await page.keyboard.press("Enter")
    await expect(page.locator("#versions li.version")).to_have_count(1)
    assert requested and all(API_TOKEN not in url for url in requested)


async def test_an_object_with_a_thousand_versions_renders_within_300_ms(
        start_service: Callable[..., Service], db_url: str, page: Page) -> None:
    service = start_service()

    async def seed() -> None:
        conn = await asyncpg.connect(db_url)
        await init_connection(conn)
        start = datetime(2025, 1, 1, tzinfo=UTC)
        try:
            events = []
            for n in range(1000):
                at = start + timedelta(minutes=n)
                previous = None if n == 0 else {
                    "status": f"s{n - 1}", "updated_date": (at - timedelta(minutes=1)).isoformat()}
                events.append(envelope("order.updated" if n else "order.created",
                                       {"id": "ord_big", "status": f"s{n}",
                                        "updated_date": at.isoformat()}, previous=previous))
            await append(conn, *events)
        finally:
            await conn.close()
        await wait_projected(db_url)

    await seed()
    await log_in(page, service)
    await expect(page.get_by_label("Id, order number or SKU")).to_be_focused()
    shown, complete = [], []
    for _ in range(3):
        await page.evaluate("location.hash = '#/'")
        await expect(page.get_by_label("Id, order number or SKU")).to_be_visible()
        # Shown: the newest versions and the current state are on the screen; complete: all
        # 1,000 versions are in the page.
        first, whole = await page.evaluate("""async () => {
            const began = performance.now();
            location.hash = '#/object?resource=order&id=ord_big';
            const until = (ready) => new Promise((done) => {
                const check = () => ready() ? done(performance.now() - began) : requestAnimationFrame(check);
                check();
            });
            const first = await until(() => document.querySelector('#versions li.version')
                                            && document.getElementById('state-status'));
            const whole = await until(() => document.querySelectorAll('#versions li.version').length === 1000);
            return [first, whole];
        }""")
        shown.append(first)
        complete.append(whole)
    await expect(page.locator("#versions li.version").first).to_contain_text("s998")
    await expect(page.locator("#state-status")).to_have_text("s999")
    (ARTIFACTS / "thousand-versions.json").write_text(
        json.dumps({"shown_ms": shown, "complete_ms": complete}))
    assert min(shown) < 300, (shown, complete)
    assert min(complete) < 2000, (shown, complete)
    await page.screenshot(path=ARTIFACTS / "thousand-versions.png")


async def test_the_page_loads_without_errors_while_the_api_wants_the_token(
        start_service: Callable[..., Service], page: Page) -> None:
    service = start_service()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{service.url}/explore/overview", timeout=10)
    assert refused.value.code == 401
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await log_in(page, service)
    await expect(page.get_by_label("Id, order number or SKU")).to_be_focused()
    # From the keyboard: the skip link moves focus to the content and leaves the route alone.
    await page.goto(f"{service.url}/ui/#/overview")
    await expect(page.locator("#log-events")).to_have_text("0")
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("#view")).to_be_focused()
    assert page.url.endswith("#/overview")
    assert errors == []
