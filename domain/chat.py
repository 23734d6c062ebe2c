"""The chat assistant's conversations: a user's questions and the assistant's answers, persisted.

A conversation belongs to one user and is tied to the project it was started on; each turn records
the project it was about. Asking is two steps, so the socket can acknowledge before the answer runs:
:meth:`ChatService.begin` (one unit of work: check the asker, pick the project, store the question,
read the last turns) and :meth:`ChatService.answer` (the responder — ``agentic.assistant`` — streams
the answer through ``emit``, then one unit of work stores it: complete, cancelled with what was
streamed so far, or failed with the reason). ``ask`` does both (REST).

Conversations are not in the event log: the log is readable by every member of the project, a
conversation only by its owner.

What the assistant reads — the projects the asker belongs to, and their books — comes through the
read-only :class:`ChatView` (``storage/assistant.py``) on the same read-only sessions the brain uses.
Its model calls, in LLM mode, go through :func:`call_model`: SmartSpace's own spend path, in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import msgspec
from msgspec import Meta

from domain.base import SYSTEM, Actor, Page, PageRequest, new_id, utcnow
from domain.budgets import Budget
from domain.errors import ApprovalRequired, DomainError, NotFound
from domain.payments import Deposit, Payment
from domain.spend import SpendCommand, SpendRequest
from domain.usage import UsageRow
from domain.wallet import Wallet

if TYPE_CHECKING:
    from domain.scope import Scope
    from domain.spend import Spending

HISTORY_MESSAGES = 10  # the last turns given to the assistant as the context of the next answer
TITLE_LENGTH = 80


# ---------------------------------------------------------------- entities and bodies
class Conversation(msgspec.Struct, kw_only=True):
    id: str
    user_id: str
    project_id: str
    title: str
    created_at: datetime
    updated_at: datetime


class ChatMessage(msgspec.Struct, kw_only=True):
    id: str
    conversation_id: str
    role: str  # user | assistant
    content: str
    status: str  # complete | cancelled | failed
    project_id: str
    data: dict[str, Any] | None
    created_at: datetime


class ConversationDetail(Conversation, kw_only=True):
    """GET /chatbot/conversations/{id}: the conversation with its messages in order."""

    messages: list[ChatMessage]


ID_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"  # what ids look like; anything else cannot name a row
Id = Annotated[str, Meta(pattern=ID_PATTERN, description="an id this API returned")]


class ChatAsk(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /api/v1/chatbot/chat (and the socket's ``message``, whose field is ``text``)."""

    message: Annotated[str, Meta(min_length=1, max_length=4000, pattern=r"^[^\x00]*$",
                                        description="text without NUL characters")]  # PostgreSQL text: no NUL
    conversation_id: Id | None = None
    project_id: Id | None = None


class ChatReply(msgspec.Struct, kw_only=True):
    conversation_id: str
    message_id: str
    response: str
    data: dict[str, Any] | None = None


class Turn(msgspec.Struct, kw_only=True):
    """One question on its way to an answer."""

    actor: Actor
    conversation: Conversation
    project_id: str
    question: ChatMessage
    answer_id: str  # the id the answer will be stored under (acknowledged before it exists)
    history: list[ChatMessage]  # earlier turns, oldest first


class Reply(msgspec.Struct, kw_only=True):
    text: str
    data: dict[str, Any] = {}


# ---------------------------------------------------------------- ports
class ChatRepo(Protocol):
    async def insert_conversation(self, conversation: Conversation) -> None: ...
    async def conversation(self, conversation_id: str) -> Conversation | None: ...
    async def touch(self, conversation_id: str, now: datetime) -> None: ...
    async def conversations(self, user_id: str, page: PageRequest) -> Page[Conversation]: ...
    async def insert_message(self, message: ChatMessage) -> None: ...
    async def messages(self, conversation_id: str, *, last: int | None = None) -> list[ChatMessage]: ...
    async def first_project(self, user_id: str) -> str | None: ...


class ChatView(Protocol):
    """The assistant's read-only view of the books (``storage/assistant.py``). It answers for whatever
    project it is asked about: checking that the asker may read it is the caller's job (:meth:`role`)."""

    async def role(self, project_id: str, user_id: str) -> str | None: ...
    async def project_name(self, project_id: str) -> str | None: ...
    async def spend(self, project_id: str, since: datetime, until: datetime, by: str) -> list[UsageRow]: ...
    async def names(self, project_id: str) -> dict[str, dict[str, str]]: ...
    async def budgets(self, project_id: str) -> list[Budget]: ...
    async def wallet(self, project_id: str) -> Wallet | None: ...
    async def request(self, project_id: str, request_id: str) -> SpendRequest | None: ...
    async def requests(self, project_id: str, statuses: tuple[str, ...], limit: int) -> list[SpendRequest]: ...
    async def payments(self, project_id: str, limit: int) -> list[Payment]: ...
    async def deposits(self, project_id: str, limit: int) -> list[Deposit]: ...
    async def insights(self, project_id: str, limit: int) -> list[dict[str, Any]] | None: ...


Emit = Callable[[str], Awaitable[None]]


class Responder(Protocol):
    """The assistant (``agentic.assistant.Assistant``): answers a turn, streaming deltas through ``emit``.
    A DomainError it raises (its model call refused, …) is the answer's failure reason."""

    async def respond(self, turn: Turn, emit: Emit) -> Reply: ...


# ---------------------------------------------------------------- the assistant's model call
class ModelTurn(msgspec.Struct, kw_only=True):
    request_id: str
    content: str
    tool_calls: list[dict[str, Any]]
    cost_micros: int


ASSISTANT = Actor(kind="system", id="assistant")


async def call_model(spending: Spending, model: str, project_id: str, asked_by: str, messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]]) -> ModelTurn:
    """One model call of the assistant, through SmartSpace's own spend path in-process: priced,
    policy-checked, reserved and settled against the asking project like any agent's call (it is a
    request of the project's, by ``system:assistant``, with the asker in its metadata). Any member —
    a viewer too — may ask; the project's budgets and policy decide whether the call may spend.
    Refusals raise their DomainError (budget_exceeded, insufficient_funds, policy_violation, …)."""
    result = await spending.run(ASSISTANT, SpendCommand(
        model=model, messages=messages, params={"tools": tools, "tool_choice": "auto"}, project_id=project_id,
        metadata={"assistant": True, "asked_by": asked_by}))
    request = result.request
    if result.status_code == 202:
        raise ApprovalRequired("the project's policy holds the assistant's model call for approval",
                               {"request_id": request.id})
    message = ((request.response or {}).get("choices") or [{}])[0].get("message") or {}
    return ModelTurn(request_id=request.id, content=str(message.get("content") or ""),
                     tool_calls=list(message.get("tool_calls") or []), cost_micros=request.cost_micros or 0)


# ---------------------------------------------------------------- the service
UowFactory = Callable[[Actor], contextlib.AbstractAsyncContextManager["Scope"]]


class ChatService:
    """``container.chat``: built once; every method opens its own units of work."""

    def __init__(self, *, uow: UowFactory, reader: UowFactory, responder: Responder,
                 history_messages: int = HISTORY_MESSAGES) -> None:
        self.uow = uow
        self.reader = reader
        self.responder = responder
        self.history_messages = history_messages

    async def ask(self, actor: Actor, ask: ChatAsk) -> ChatReply:
        """REST: the whole answer in one body."""
        turn = await self.begin(actor, ask)
        reply = await self.answer(turn)
        return ChatReply(conversation_id=turn.conversation.id, message_id=turn.answer_id, response=reply.text,
                         data=reply.data or None)

    async def begin(self, actor: Actor, ask: ChatAsk) -> Turn:
        now = utcnow()
        async with self.uow(actor) as scope:
            user_id = scope.require_user()
            repo: ChatRepo = scope.store.chat
            conversation = None
            if ask.conversation_id is not None:
                conversation = await repo.conversation(ask.conversation_id)
                if conversation is None or conversation.user_id != user_id:
                    raise NotFound("conversation not found", {"conversation_id": ask.conversation_id})
            project_id = ask.project_id or (conversation.project_id if conversation else None) \
                or await repo.first_project(user_id)
            if project_id is None:
                raise NotFound("you are not a member of any project yet", {})
            await scope.projects.require(project_id, "viewer")  # not a member: not found, nothing else
            if conversation is None:
                title = " ".join(ask.message.split())[:TITLE_LENGTH]
                conversation = Conversation(id=new_id("cnv"), user_id=user_id, project_id=project_id, title=title,
                                            created_at=now, updated_at=now)
                await repo.insert_conversation(conversation)
                history: list[ChatMessage] = []
            else:
                history = await repo.messages(conversation.id, last=self.history_messages)
                await repo.touch(conversation.id, now)
            question = ChatMessage(id=new_id("msg"), conversation_id=conversation.id, role="user",
                                   content=ask.message, status="complete", project_id=project_id, data=None,
                                   created_at=now)
            await repo.insert_message(question)
        return Turn(actor=actor, conversation=conversation, project_id=project_id, question=question,
                    answer_id=new_id("msg"), history=history)

    async def answer(self, turn: Turn, emit: Emit | None = None) -> Reply:
        """Run the responder and store its answer. Cancelled (the asker cancelled or went away): what was
        streamed so far is stored as a cancelled answer, then the cancellation goes on. A DomainError
        (the model call refused …) is stored as a failed answer and raised with the turn's ids."""
        streamed: list[str] = []

        async def relay(delta: str) -> None:
            streamed.append(delta)
            if emit is not None:
                await emit(delta)

        try:
            reply = await self.responder.respond(turn, relay)
        except asyncio.CancelledError:
            await asyncio.shield(self._store(turn, Reply(text="".join(streamed)), "cancelled"))
            raise
        except DomainError as exc:
            exc.details = {**exc.details, "conversation_id": turn.conversation.id, "message_id": turn.answer_id}
            await self._store(turn, Reply(text=f"I could not answer: {exc.message}",
                                          data={"error": {"code": exc.code, "message": exc.message}}), "failed")
            raise
        await self._store(turn, reply, "complete")
        return reply

    async def _store(self, turn: Turn, reply: Reply, status: str) -> None:
        now = utcnow()
        async with self.uow(SYSTEM) as scope:
            await scope.store.chat.insert_message(ChatMessage(
                id=turn.answer_id, conversation_id=turn.conversation.id, role="assistant", content=reply.text,
                status=status, project_id=turn.project_id, data=reply.data or None, created_at=now))
            await scope.store.chat.touch(turn.conversation.id, now)

    # ------------------------------------------------------------ reads
    async def conversations(self, actor: Actor, page: PageRequest) -> Page[Conversation]:
        async with self.reader(actor) as scope:
            return await scope.store.chat.conversations(scope.require_user(), page)

    async def conversation(self, actor: Actor, conversation_id: str) -> ConversationDetail:
        async with self.reader(actor) as scope:
            user_id = scope.require_user()
            found = await scope.store.chat.conversation(conversation_id) if re.match(ID_PATTERN, conversation_id) \
                else None
            if found is None or found.user_id != user_id:
                raise NotFound("conversation not found", {"conversation_id": conversation_id})
            messages = await scope.store.chat.messages(conversation_id)
        return ConversationDetail(**msgspec.structs.asdict(found), messages=messages)
