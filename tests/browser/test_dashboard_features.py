"""Panels that need features built on other branches: they skip while those routes answer 404."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests.browser.conftest import Browser, Dashboard, sign_in


@pytest.mark.needs_chat
async def test_a_question_in_the_chat_gets_a_streamed_answer(dashboard: Dashboard, browser: Browser) -> None:
    project = await dashboard.project()
    code, _ = await dashboard.chat(project.key, "something to talk about", max_tokens=32)
    assert code == 200
    await sign_in(browser, dashboard)
    page = browser.page
    # record every state the answer bubble goes through: it must stream before it is done
    await page.evaluate("""() => {
        window.__chat = [];
        new MutationObserver(() => document.querySelectorAll('#chat-log .msg.assistant').forEach(m =>
            window.__chat.push([m.classList.contains('streaming'), m.hasAttribute('data-done'), m.textContent])))
          .observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true,
                                                         attributes: true});
    }""")
    await page.get_by_test_id("chat-input").fill("How much did we spend today?")
    await page.get_by_test_id("chat-send").click()
    answer = page.get_by_test_id("chat-log").locator(".msg.assistant[data-done]")
    await expect(answer).to_have_count(1)
    text = await answer.text_content()
    assert text and text.strip()
    states = await page.evaluate("window.__chat")
    assert any(streaming and not done for streaming, done, _ in states), states
    await browser.shot("chat")
    assert browser.errors == []


@pytest.mark.needs_insights
async def test_an_insight_appears_live_and_can_be_dismissed(dashboard: Dashboard, browser: Browser) -> None:
    project = await dashboard.project()
    base = f"/api/v1/projects/{project.project_id}"
    await sign_in(browser, dashboard)
    page = browser.page
    # 12 refusals within a minute for one agent: a rejection_burst insight
    await dashboard.call("PUT", f"{base}/policy", project.token, {"blocked_models": ["local/echo-1"]}, expect=200)
    for _ in range(12):
        code, _ = await dashboard.chat(project.key, "refused")
        assert code == 403
    insight = page.get_by_test_id("insights").locator("[data-insight-id]")
    await expect(insight.first).to_be_visible(timeout=30_000)
    insight_id = await insight.first.get_attribute("data-insight-id")
    await browser.shot("insight")
    await page.get_by_test_id(f"insight-{insight_id}-dismiss").click()
    await expect(page.locator(f'[data-insight-id="{insight_id}"]')).to_have_count(0)
    _, row = await dashboard.call("GET", f"{base}/insights/{insight_id}", project.token, expect=200)
    assert row["status"] == "dismissed"
    assert browser.errors == []
