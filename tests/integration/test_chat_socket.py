"""The assistant on /chat with real python-socketio clients over loopback (built-in mode): the ack at once,
the answer streamed to the asking socket alone (deltas, then one chat.message with the figures), cancel, and
what a stranger or a viewer gets over this transport."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from agentic.tools import usd
from tests.factories import add_member, register
from tests.integration.spend_helpers import fund, platform_admin
from tests.integration.test_chat import traffic
from tests.live import LiveClient


@pytest.fixture
async def chat(client):
    """Factory of connected /chat LiveClients, all disconnected at the end."""
    async with AsyncExitStack() as stack:
        async def make(token) -> LiveClient:
            lc = LiveClient(str(client.make_url("/")), token, "/chat")
            await lc.connect()
            stack.push_async_callback(lc.disconnect)
            return lc

        yield make


@pytest.fixture
async def books(client):
    admin = await platform_admin(client)
    owner = await register(client)
    await fund(client, admin, owner.project_id, 5_000_000)
    return await traffic(client, owner)


def answers(lc: LiveClient, message_id: str) -> list[tuple[str, dict]]:
    return [(n, d) for n, d in zip(lc.names, lc.received, strict=True) if d.get("message_id") == message_id]


async def answered(lc: LiveClient, message_id: str) -> dict:
    await lc.until(lambda: any(n == "chat.message" for n, _ in answers(lc, message_id)), what="chat.message")
    return answers(lc, message_id)[-1][1]


async def test_the_answer_streams_as_deltas_then_one_message_to_the_asking_socket_only(client, chat, books):
    asking, other = await chat(books.owner.token), await chat(books.owner.token)
    ack = await asking.call("message", {"text": "How much did we spend today, by agent?"})
    assert ack["ok"] is True and set(ack) == {"ok", "conversation_id", "message_id"}
    final = await answered(asking, ack["message_id"])

    stream = answers(asking, ack["message_id"])
    names = [n for n, _ in stream]
    assert names[-1] == "chat.message" and names.count("chat.message") == 1
    assert len(names) >= 3 and set(names[:-1]) == {"chat.delta"}
    assert all(d["conversation_id"] == ack["conversation_id"] for _, d in stream)
    assert "".join(d["delta"] for n, d in stream if n == "chat.delta") == final["text"]
    figures = final["data"]["figures"]
    assert figures["total_micros"] == books.total
    assert {r["name"]: r["cost_micros"] for r in figures["rows"]} == {n: sum(c) for n, c in books.costs.items()}
    assert usd(books.total) in final["text"]

    # The same user's other socket got nothing of it (barrier: its own answer arrives, and only that).
    mine = await other.call("message", {"text": "wallet balance?"})
    await answered(other, mine["message_id"])
    assert {d["message_id"] for d in other.received} == {mine["message_id"]}
    assert {d["message_id"] for d in asking.received} == {ack["message_id"]}

    stored = await (await client.get(f"/api/v1/chatbot/conversations/{ack['conversation_id']}",
                                     headers=books.owner.headers)).json()
    assert [m["content"] for m in stored["messages"]] == ["How much did we spend today, by agent?", final["text"]]
    assert stored["messages"][1]["id"] == ack["message_id"]


async def test_a_follow_up_on_the_socket_continues_the_conversation(chat, books):
    lc = await chat(books.owner.token)
    first = await lc.call("message", {"text": "what did we spend today?"})
    await answered(lc, first["message_id"])
    follow = await lc.call("message", {"text": "and by key?", "conversation_id": first["conversation_id"]})
    assert follow["conversation_id"] == first["conversation_id"]
    final = await answered(lc, follow["message_id"])
    assert final["data"]["args"]["by"] == "key"
    assert sum(r["cost_micros"] for r in final["data"]["figures"]["rows"]) == books.total


async def test_cancel_without_an_answer_in_progress_says_so(chat, books):
    lc = await chat(books.owner.token)
    ack = await lc.call("message", {"text": "what did we spend today?"})
    await answered(lc, ack["message_id"])
    assert await lc.call("cancel", {"conversation_id": ack["conversation_id"]}) == {
        "ok": True, "conversation_id": ack["conversation_id"], "cancelled": False}
    bad = await lc.call("cancel", {})
    assert bad["ok"] is False and bad["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("data", [None, "text", {}, {"text": ""}, {"text": 7}, {"text": "hi", "conversation_id": 3}])
async def test_a_bad_message_is_refused_in_the_ack(chat, books, data):
    lc = await chat(books.owner.token)
    ack = await lc.call("message", data)
    assert ack["ok"] is False and ack["error"]["code"] == "invalid_request"
    assert lc.received == []


async def test_a_stranger_learns_nothing_over_the_socket(client, chat, books):
    stranger = await register(client)
    lc = await chat(stranger.token)
    refused = await lc.call("message", {"text": "what did we spend today?", "project_id": books.owner.project_id})
    assert refused == {"ok": False, "error": {"code": "not_found", "message": "project not found"}}
    target = books.owner.project_id
    ack = await lc.call("message", {"text": f"how much is left in the budgets of {target}?"})
    final = await answered(lc, ack["message_id"])
    assert final["data"]["figures"] == {"error": {"code": "not_found", "message": f"project {target} not found"}}
    ghost = await lc.call("message", {"text": "how much is left in the budgets of prj_000000000000deadbeef?"})
    assert (await answered(lc, ghost["message_id"]))["text"].replace("prj_000000000000deadbeef", "X") == \
        final["text"].replace(target, "X")
    owner_socket = await chat(books.owner.token)
    mine = await owner_socket.call("message", {"text": "what did we spend today?"})
    taken = await lc.call("message", {"text": "and yesterday?", "conversation_id": mine["conversation_id"]})
    assert taken["ok"] is False and taken["error"]["code"] == "not_found"


async def test_a_viewer_can_ask_over_the_socket(client, chat, books):
    viewer = await register(client)
    await add_member(client, books.owner, viewer, "viewer")
    lc = await chat(viewer.token)
    ack = await lc.call("message", {"text": "what did we spend today?", "project_id": books.owner.project_id})
    final = await answered(lc, ack["message_id"])
    assert final["data"]["figures"]["total_micros"] == books.total
