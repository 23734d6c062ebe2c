"""The chat assistant over REST (API.md "Chat assistant"): the whole answer in one body."""

from __future__ import annotations

from aiohttp import web

from domain.base import Page
from domain.chat import ChatAsk, ChatReply, Conversation, ConversationDetail
from server.http import PAGE_QUERY, actor, decode, json_response, page_request, routes
from server.http import container as _c
from server.idempotency import idempotent


@routes.post("/api/v1/chatbot/chat", summary="Ask the assistant about your projects' spend (the REST fallback of "
             "/chat): the answer with the figures it used (Idempotency-Key honoured)", tag="chat", body=ChatAsk,
             response=ChatReply, errors=(401, 402, 403, 404, 409, 422, 429, 502, 504))
async def chat(request: web.Request) -> web.StreamResponse:
    ask = await decode(request, ChatAsk)
    who = actor(request)

    async def run() -> web.Response:  # with an assistant model an answer spends: Idempotency-Key honoured
        return json_response(await _c(request).chat.ask(who, ask))

    # Keys are claimed per project; a question that names none is scoped to its asker.
    return await idempotent(request, who, ask.project_id or who.label, ask, run)


@routes.get("/api/v1/chatbot/conversations", summary="The caller's conversations, newest first", tag="chat",
            response=Page[Conversation], query=PAGE_QUERY, errors=(401, 422))
async def conversations(request: web.Request) -> web.Response:
    page = page_request(request)
    return json_response(await _c(request).chat.conversations(actor(request), page))


@routes.get("/api/v1/chatbot/conversations/{conversation_id}", summary="One of the caller's conversations with "
            "its messages in order", tag="chat", response=ConversationDetail, errors=(401, 404))
async def conversation(request: web.Request) -> web.Response:
    return json_response(await _c(request).chat.conversation(actor(request), request.match_info["conversation_id"]))
