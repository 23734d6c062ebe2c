"""The ``/chat`` namespace: the hub's subscribe/unsubscribe, plus asking the assistant.

- ``message`` ``{text, conversation_id?, project_id?}``: the question is stored and acknowledged at once
  ``{ok, conversation_id, message_id}`` (``message_id``: the answer's); the answer then streams to the
  asking socket alone (its sid, never a room) as ``chat.delta`` ``{conversation_id, message_id, delta}``
  and ends with one ``chat.message`` ``{conversation_id, message_id, text, data}`` (``data``: the
  figures used; with ``error`` ``{code, message}`` instead when the answer failed, e.g. the
  assistant's model call was refused by the project's budget).
- ``cancel`` ``{conversation_id}``: stops that conversation's answer on this socket. The ack comes once
  it has stopped, so nothing of it arrives after the ack.
- A socket that disconnects takes its answers with it: they are cancelled, and with them the model
  call in flight (the spend path releases its reservation and charges nothing more).

The answers running here (an asyncio task per socket and conversation) are this process's, like the
hub's hold buffers; everything about the conversation itself is in the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from channels.hub import Hub, ProjectNamespace, ack_error
from domain.chat import ChatAsk, ChatService, Turn
from domain.errors import Conflict, DomainError, InvalidRequest
from domain.events import CHAT

log = logging.getLogger("smartspace.chat")
UNAVAILABLE = {"ok": False, "error": {"code": "unavailable", "message": "try again"}}


class ChatNamespace(ProjectNamespace):
    def __init__(self, hub: Hub, chat: ChatService) -> None:
        super().__init__(CHAT, hub)
        self.chat = chat
        self.answers: dict[tuple[str, str], asyncio.Task[None]] = {}  # (sid, conversation_id) → the answer

    async def on_message(self, sid: str, data: Any = None) -> dict[str, Any]:
        try:
            ask = _ask(data)
            if ask.conversation_id and (sid, ask.conversation_id) in self.answers:
                raise Conflict("an answer in this conversation is still streaming: wait for it or cancel it",
                               {"conversation_id": ask.conversation_id})
            session = await self.get_session(sid)
            actor = await self.hub.container.authenticate(session["token"])
            turn = await self.chat.begin(actor, ask)
        except DomainError as exc:
            return ack_error(exc)
        except Exception:
            log.exception("chat message failed", extra={"sid": sid})
            return UNAVAILABLE
        key = (sid, turn.conversation.id)
        task = asyncio.create_task(self._answer(sid, turn), name=f"chat-answer-{turn.answer_id}")
        self.answers[key] = task
        task.add_done_callback(lambda done: self.answers.pop(key) if self.answers.get(key) is done else None)
        return {"ok": True, "conversation_id": turn.conversation.id, "message_id": turn.answer_id}

    async def _answer(self, sid: str, turn: Turn) -> None:
        ids = {"conversation_id": turn.conversation.id, "message_id": turn.answer_id}

        async def delta(text: str) -> None:
            await self.emit("chat.delta", {**ids, "delta": text}, to=sid)

        try:
            reply = await self.chat.answer(turn, delta)
        except DomainError as exc:
            await self.emit("chat.message", {**ids, "text": f"I could not answer: {exc.message}",
                                             "error": {"code": exc.code, "message": exc.message}}, to=sid)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("chat answer failed", extra={"sid": sid, **ids})
            await self.emit("chat.message", {**ids, "text": "I could not answer: something went wrong, try again.",
                                             "error": UNAVAILABLE["error"]}, to=sid)
            return
        await self.emit("chat.message", {**ids, "text": reply.text, "data": reply.data}, to=sid)

    async def on_cancel(self, sid: str, data: Any = None) -> dict[str, Any]:
        conversation_id = data.get("conversation_id") if isinstance(data, dict) else None
        if not isinstance(conversation_id, str) or not conversation_id:
            return ack_error(InvalidRequest("send {conversation_id}"))
        task = self.answers.get((sid, conversation_id))
        if task is None:
            return {"ok": True, "conversation_id": conversation_id, "cancelled": False}
        task.cancel()
        await asyncio.wait({task})
        return {"ok": True, "conversation_id": conversation_id, "cancelled": True}

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        await super().on_disconnect(sid, reason)
        for (owner, _), task in list(self.answers.items()):
            if owner == sid:
                task.cancel()

    async def close(self) -> None:
        tasks = list(self.answers.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


def _ask(data: Any) -> ChatAsk:
    if not isinstance(data, dict):
        raise InvalidRequest("send {text, conversation_id?, project_id?}")
    fields = {"message": data.get("text"), "conversation_id": data.get("conversation_id"),
              "project_id": data.get("project_id")}
    try:
        return msgspec.convert(fields, ChatAsk)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc).replace("$.message", "text"), {"fields": ["text", "conversation_id",
                                                                              "project_id"]}) from None


def attach(app: web.Application, hub: Hub, chat: ChatService) -> ChatNamespace:
    """Put the chat handlers on ``/chat`` (in place of the hub's plain subscribe-only namespace)."""
    namespace = ChatNamespace(hub, chat)
    hub.sio.register_namespace(namespace)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        await namespace.close()  # before the database goes away

    app.cleanup_ctx.append(lifecycle)
    return namespace

