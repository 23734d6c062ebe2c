"""The dashboard in a real browser: sign in, live updates without reload, approvals, reconnects."""

from __future__ import annotations

import asyncio

from playwright.async_api import expect

from tests.browser.conftest import Browser, Dashboard, sign_in


async def test_sign_in_shows_the_wallet_and_the_budgets(dashboard: Dashboard, browser: Browser) -> None:
    project = await dashboard.project()
    await sign_in(browser, dashboard)
    page = browser.page
    await expect(page.get_by_test_id("wallet-available")).to_have_text("$5.00 USDC")
    budget = page.get_by_test_id(f"budget-{project.budget_id}")
    await expect(budget).to_contain_text("daily")
    await expect(budget).to_contain_text("limit $1.00")
    await expect(page.get_by_test_id("project-select")).to_have_value(project.project_id)
    await browser.shot("signed-in")
    assert browser.errors == []


async def _feed_row(browser: Browser, request_id: str):
    return browser.page.get_by_test_id("request-feed").locator(f'[data-request-id="{request_id}"]')


async def test_a_gateway_call_shows_in_the_feed_and_moves_the_budget_bar_without_reload(
        dashboard: Dashboard, browser: Browser) -> None:
    project = await dashboard.project()
    await sign_in(browser, dashboard)
    page = browser.page
    budget = page.get_by_test_id(f"budget-{project.budget_id}")
    await expect(budget).to_have_attribute("data-spent-micros", "0")
    await page.evaluate("window.__sameDocument = true")  # lost on any reload or navigation

    status, request_id = await dashboard.chat(project.key, "Summarise the quarter", max_tokens=64)
    assert status == 200 and request_id
    _, row = await dashboard.call("GET", f"/api/v1/requests/{request_id}", project.token, expect=200)
    cost = row["cost_micros"]
    assert cost > 0

    item = await _feed_row(browser, request_id)
    await expect(item).to_have_attribute("data-status", "settled")
    await expect(item).to_contain_text("local/echo-1")
    await expect(item).to_contain_text("researcher")
    await expect(item).to_contain_text("approved")
    await expect(page.get_by_test_id("request-feed").locator("[data-request-id]").first).to_have_attribute(
        "data-request-id", request_id)  # newest first
    await expect(budget).to_have_attribute("data-spent-micros", str(cost))
    await expect(page.get_by_test_id("wallet-available")).to_have_attribute("data-micros", str(5_000_000 - cost))
    assert await page.evaluate("window.__sameDocument") is True
    chart = page.get_by_test_id("spend-chart")
    await expect(chart.locator("canvas")).to_have_count(1)
    await expect(chart).to_contain_text("local/echo-1")  # the legend: one line per model
    await page.locator("#chart-by").select_option("agent")
    await expect(chart).to_contain_text("researcher")
    await browser.shot("after-call")
    assert browser.errors == []


async def test_approving_a_held_request_with_the_button_lets_it_settle(dashboard: Dashboard, browser: Browser) -> None:
    project = await dashboard.project()
    # hold anything estimated at 500 µUSDC or more (max_tokens=4000 on local/echo-1 is ~800 µUSDC)
    await dashboard.call("PUT", f"/api/v1/projects/{project.project_id}/policy", project.token, expect=200,
                         json={"require_approval_above_micros": 500})
    await sign_in(browser, dashboard)
    page = browser.page
    waiting = asyncio.create_task(dashboard.chat(project.key, "a long report", max_tokens=4000,
                                                 headers={"X-SmartSpace-Wait": "60"}))
    approve = page.locator('[data-testid^="approval-"][data-testid$="-approve"]')
    await expect(approve).to_have_count(1)
    testid = await approve.get_attribute("data-testid")
    request_id = testid.removeprefix("approval-").removesuffix("-approve")
    await expect(page.get_by_test_id(f"approval-{request_id}-reject")).to_be_visible()
    item = await _feed_row(browser, request_id)
    await expect(item).to_have_attribute("data-status", "pending_approval")
    await browser.shot("held")

    await approve.click()
    status, answered_id = await asyncio.wait_for(waiting, 30)
    assert status == 200 and answered_id == request_id
    await expect(item).to_have_attribute("data-status", "settled")
    await expect(approve).to_have_count(0)
    _, row = await dashboard.call("GET", f"/api/v1/requests/{request_id}", project.token, expect=200)
    assert row["status"] == "settled" and row["resolved_by"]
    await browser.shot("approved")
    assert browser.errors == []


async def test_the_page_reconnects_after_a_server_restart_and_catches_up(dashboard: Dashboard,
                                                                         browser: Browser) -> None:
    project = await dashboard.project()
    await sign_in(browser, dashboard)
    page = browser.page
    status = page.get_by_test_id("live-status")
    code, first = await dashboard.chat(project.key, "before the restart")
    assert code == 200
    feed = page.get_by_test_id("request-feed").locator("[data-request-id]")
    await expect(feed).to_have_count(1)

    # The browser goes offline (its reconnect attempts fail) while the server restarts and requests
    # are made: the page must get them from the replay when it comes back, not live.
    await page.context.set_offline(True)
    dashboard.stop()
    await expect(status).not_to_have_text("live")
    await dashboard.start_again()
    made = [first]
    for i in range(3):
        code, request_id = await dashboard.chat(project.key, f"while away {i}")
        assert code == 200
        made.append(request_id)
    await expect(feed).to_have_count(1)  # nothing arrived while offline
    await page.context.set_offline(False)

    await expect(status).to_have_text("live")
    await expect(feed).to_have_count(4)
    for request_id in made:  # each once, settled
        await expect(await _feed_row(browser, request_id)).to_have_attribute("data-status", "settled")
    _, wallet = await dashboard.call("GET", f"/api/v1/projects/{project.project_id}/wallet", project.token)
    await expect(page.get_by_test_id("wallet-available")).to_have_attribute("data-micros",
                                                                            str(wallet["available_micros"]))
    # and the live path works again after the catch-up
    code, _ = await dashboard.chat(project.key, "after")
    assert code == 200
    await expect(feed).to_have_count(5)
    await browser.shot("caught-up")
    # the offline spell logs the failed websocket attempts; nothing else may have gone wrong
    assert [e for e in browser.errors if "ERR_INTERNET_DISCONNECTED" not in e] == []


async def test_deposits_and_payouts_appear_with_their_tx_hashes(dashboard: Dashboard, browser: Browser) -> None:
    project = await dashboard.project()
    await sign_in(browser, dashboard)
    page = browser.page
    wallet = page.get_by_test_id("wallet-available")
    await expect(wallet).to_have_attribute("data-micros", "5000000")

    await page.get_by_role("button", name="+ 10 test USDC (devnet)").click()  # devnet transfer + deposit claim
    deposit = page.get_by_test_id("payments").locator("[data-payment-id]").filter(has_text="deposit")
    await expect(deposit).to_have_count(1)
    _, deposits = await dashboard.call("GET", f"/api/v1/projects/{project.project_id}/deposits", project.token)
    tx_hash = deposits["items"][0]["tx_hash"]
    await expect(deposit).to_contain_text("+$10.00")
    await expect(deposit.locator(f'[title="{tx_hash}"]')).to_contain_text(tx_hash[:10])
    await expect(wallet).to_have_attribute("data-micros", "15000000")

    _, payout = await dashboard.call(
        "POST", f"/api/v1/projects/{project.project_id}/withdrawals", project.token, expect=201,
        headers={"Idempotency-Key": "browser-payout-1"},
        json={"to_address": "0x000000000000000000000000000000000000dEaD", "amount_micros": 2_000_000})
    row = page.get_by_test_id("payments").locator(f'[data-payment-id="{payout["id"]}"]')
    await expect(row).to_contain_text("−$2.00")
    await expect(row.locator(".status")).to_have_text("confirmed")  # pending → submitted → confirmed, live
    await expect(row.locator(f'[title="{payout["tx_hash"]}"]')).to_be_visible()
    await expect(wallet).to_have_attribute("data-micros", "13000000")
    await browser.shot("payments")
    assert browser.errors == []
