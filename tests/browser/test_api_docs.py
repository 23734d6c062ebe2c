"""The API reference at /api/docs: Swagger UI (bundled from the npm registry like the dashboard) renders the
server's own OpenAPI document under the same strict Content-Security-Policy, and a user can try a call."""

from __future__ import annotations

from playwright.async_api import expect

from tests.browser.conftest import Browser, Dashboard


async def test_the_reference_renders_every_tag_and_a_call_can_be_tried(dashboard: Dashboard, browser: Browser) -> None:
    project = await dashboard.project()
    page = browser.page
    response = await page.goto(dashboard.url + "/api/docs")
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("SmartSpace API")
    for tag in ("gateway", "requests", "wallet", "payments", "chat"):
        await expect(page.locator(f'.opblock-tag[data-tag="{tag}"]')).to_be_visible()

    # Authorize with the user's token (kept in the page's memory), then try GET /api/v1/me.
    await page.locator(".auth-wrapper .authorize").click()
    await page.locator(".auth-container input[type=text]").first.fill(project.token)
    await page.locator(".auth-btn-wrapper .authorize").first.click()
    await page.locator(".btn-done").first.click()
    await browser.shot("api-docs-authorized")
    operation = page.locator("#operations-auth-me")
    await operation.locator(".opblock-summary").click()
    await operation.locator(".execute").click()
    status = operation.locator(".live-responses-table tr.response .response-col_status").first
    await expect(status).to_contain_text("200")
    await expect(operation.locator(".live-responses-table")).to_contain_text(project.email)
    await browser.shot("api-docs")
    assert browser.errors == []
