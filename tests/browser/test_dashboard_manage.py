"""Registering from the page, and what owners manage from it: agents, keys, budgets, the policy."""

from __future__ import annotations

from playwright.async_api import expect

from tests.browser.conftest import Browser, Dashboard, sign_in


async def test_a_newcomer_registers_from_the_page_and_gets_a_live_project(dashboard: Dashboard,
                                                                          browser: Browser) -> None:
    page = browser.page
    await page.goto(dashboard.url + "/")
    await page.get_by_role("button", name="Create an account").click()
    await page.locator("#login-name").fill("Grace")
    await page.get_by_test_id("login-email").fill("grace@browser.test")
    await page.get_by_test_id("login-password").fill("a long enough password")
    await page.get_by_test_id("login-submit").click()
    await expect(page.get_by_test_id("live-status")).to_have_text("live")
    await expect(page.get_by_test_id("project-select")).to_contain_text("(owner)")
    await expect(page.get_by_test_id("wallet-available")).to_have_attribute("data-micros", "0")
    assert browser.errors == []


async def test_an_owner_adds_an_agent_a_key_a_budget_and_changes_the_policy(dashboard: Dashboard,
                                                                          browser: Browser) -> None:
    project = await dashboard.project()
    base = f"/api/v1/projects/{project.project_id}"
    await sign_in(browser, dashboard)
    page = browser.page
    admin = page.locator("#admin")

    await admin.locator('input[name="agent-name"]').fill("planner")
    await admin.get_by_role("button", name="Add agent").click()
    await expect(page.get_by_test_id("admin-status")).to_have_text("Agent planner created.")
    _, agents = await dashboard.call("GET", f"{base}/agents", project.token)
    planner = next(a for a in agents["items"] if a["name"] == "planner")

    await admin.locator('input[name="key-name"]').fill("planner key")
    await admin.locator('select[name="key-agent"]').select_option(planner["id"])
    await admin.get_by_role("button", name="Create key").click()
    await expect(page.get_by_test_id("new-key").locator("code")).to_be_visible()
    secret = (await page.get_by_test_id("new-key").locator("code").text_content()) or ""
    assert secret.startswith("sk-")
    code, request_id = await dashboard.chat(secret, "from the new key")  # the key shown once works
    assert code == 200
    await expect(page.get_by_test_id("request-feed").locator(f'[data-request-id="{request_id}"]')).to_contain_text(
        "planner")

    await admin.locator('input[name="budget-name"]').fill("planner weekly")
    await admin.locator('input[name="budget-limit"]').fill("2.5")
    await admin.locator('select[name="budget-period"]').select_option("week")
    await admin.get_by_role("button", name="Add budget").click()
    await expect(page.get_by_test_id("admin-status")).to_have_text("Budget planner weekly created ($2.50 per week).")
    _, budgets = await dashboard.call("GET", f"{base}/budgets", project.token)
    weekly = next(b for b in budgets["items"] if b["name"] == "planner weekly")
    assert (weekly["limit_micros"], weekly["period"]) == (2_500_000, "week")
    await expect(page.get_by_test_id(f"budget-{weekly['id']}")).to_contain_text("limit $2.50")

    policy = admin.locator('textarea[name="policy"]')
    rules = await policy.input_value()
    await policy.fill(rules.replace('"blocked_models": []', '"blocked_models": ["openai/gpt-4"]'))
    await admin.get_by_role("button", name="Save policy").click()
    await expect(page.get_by_test_id("admin-status")).to_have_text("Policy saved: version 1.")
    _, saved = await dashboard.call("GET", f"{base}/policy", project.token)
    assert saved["blocked_models"] == ["openai/gpt-4"] and saved["version"] == 1

    await policy.fill('{"max_risk_score": 42}')  # the server's 422 is shown, nothing changes
    await admin.get_by_role("button", name="Save policy").click()
    await expect(page.get_by_test_id("admin-status")).to_contain_text("invalid_request")
    _, unchanged = await dashboard.call("GET", f"{base}/policy", project.token)
    assert unchanged["version"] == 1
    await browser.shot("managed")
    assert browser.errors == []


async def test_a_viewer_sees_the_board_but_cannot_approve_or_manage(dashboard: Dashboard, browser: Browser) -> None:
    project = await dashboard.project()
    base = f"/api/v1/projects/{project.project_id}"
    await dashboard.call("POST", "/api/v1/auth/register", expect=201,
                         json={"email": "viewer@browser.test", "password": "viewer password", "name": "V"})
    await dashboard.call("POST", f"{base}/members", project.token, {"email": "viewer@browser.test", "role": "viewer"},
                         expect=201)
    await dashboard.call("PUT", f"{base}/policy", project.token, {"require_approval_above_micros": 500}, expect=200)
    code, held = await dashboard.chat(project.key, "a long report", max_tokens=4000)
    assert code == 403 and held
    await sign_in(browser, dashboard, "viewer@browser.test", "viewer password")
    page = browser.page
    select = page.get_by_test_id("project-select")
    await select.select_option(project.project_id)
    await expect(page.get_by_test_id("live-status")).to_have_text("live")
    await expect(page.get_by_test_id(f"approval-{held}-approve")).to_be_disabled()
    await expect(page.locator("#admin-card")).to_be_hidden()
    await expect(page.get_by_test_id(f"budget-{project.budget_id}")).to_be_visible()
