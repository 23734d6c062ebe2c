"""Conversations and messages of the chat assistant (``domain.chat.ChatRepo``)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import Page, PageRequest
from domain.chat import ChatMessage, Conversation
from storage.base import Repository, decode_cursor
from storage.models import chat_conversations, chat_messages, memberships, projects

c, m = chat_conversations.c, chat_messages.c


class _Conversations(Repository[Conversation]):
    table = chat_conversations
    entity = Conversation


class _Messages(Repository[ChatMessage]):
    table = chat_messages
    entity = ChatMessage


class ChatStore:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._conversations = _Conversations(conn)
        self._messages = _Messages(conn)

    async def insert_conversation(self, conversation: Conversation) -> None:
        await self._conversations.insert(conversation)

    async def conversation(self, conversation_id: str) -> Conversation | None:
        return await self._conversations.get(conversation_id)

    async def touch(self, conversation_id: str, now: datetime) -> None:
        await self.conn.execute(sa.update(chat_conversations).where(c.id == conversation_id).values(updated_at=now))

    async def conversations(self, user_id: str, page: PageRequest) -> Page[Conversation]:
        """The user's conversations, newest first (by id: ids sort by creation time)."""
        stmt = sa.select(chat_conversations).where(c.user_id == user_id)
        if page.cursor:
            stmt = stmt.where(c.id < decode_cursor(page.cursor))
        rows = (await self.conn.execute(stmt.order_by(c.id.desc()).limit(page.limit + 1))).all()
        return self._conversations.page_of(rows, page.limit)

    async def insert_message(self, message: ChatMessage) -> None:
        await self._messages.insert(message)

    async def messages(self, conversation_id: str, *, last: int | None = None) -> list[ChatMessage]:
        """In order, oldest first; ``last``: only the most recent ones. By time first: a question and its
        answer's id are made in the same millisecond, whose ids then sort at random."""
        stmt = sa.select(chat_messages).where(m.conversation_id == conversation_id)
        if last is None:
            rows = (await self.conn.execute(stmt.order_by(m.created_at, m.id))).all()
        else:
            newest = stmt.order_by(m.created_at.desc(), m.id.desc()).limit(last)
            rows = list(reversed((await self.conn.execute(newest)).all()))
        return [self._messages.to_entity(r) for r in rows]

    async def first_project(self, user_id: str) -> str | None:
        """The user's first project (the default one made at registration, unless it was deleted)."""
        return (await self.conn.execute(
            sa.select(projects.c.id).join(memberships, memberships.c.project_id == projects.c.id)
            .where(memberships.c.user_id == user_id, projects.c.status != "deleted")
            .order_by(projects.c.created_at, projects.c.id).limit(1))).scalar()
