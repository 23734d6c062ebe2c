"""The chat assistant (``domain.chat.Responder``): two modes over one set of read tools.

- **Built-in** (no ``SMARTSPACE_ASSISTANT_MODEL``): :mod:`agentic.intents` picks the tool and its
  arguments from the question (and the previous turn, for follow-ups), the tool reads, the answer is
  phrased from its result. It says plainly what it cannot answer and which questions it can.
- **LLM** (``SMARTSPACE_ASSISTANT_MODEL`` = a catalog model): an agent loop with tool calling. Each
  model call goes through ``domain.chat.call_model`` — SmartSpace's own spend path, in-process — so it
  is priced, policy-checked, reserved and settled against the asking project; the tools' results go
  back to the model with every amount pre-formatted exactly (``*_usd``).

The answer streams through ``emit`` in small pieces. Cancelling the task (the asker cancelled or
disconnected) cancels the model call in flight; the spend path then releases its reservation.
Nothing here writes: the tools read a read-only view, the spend path and ``domain.chat`` persist.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import msgspec

from agentic import intents
from agentic.tools import OpenView, Toolbox, for_model, iso, openai_tools
from domain.base import utcnow
from domain.chat import Emit, ModelTurn, Reply, Turn

MAX_TOOL_ROUNDS = 5
# project, asked_by, messages, tools
ModelCall = Callable[[str, str, list[dict[str, Any]], list[dict[str, Any]]], Awaitable[ModelTurn]]

SYSTEM_PROMPT = """You are SmartSpace's spend assistant for the project "{name}" ({project_id}).
Answer questions about its AI spend, budgets, wallet, refused or held requests, approvals, payments and insights.
Use the tools for every figure: never guess a number, never compute money yourself when a tool gives it.
Quote amounts exactly as the tools' *_usd fields give them (e.g. $0.000042), never rounded.
If a tool answers not_found, say it was not found and nothing more about it.
If the tools cannot answer the question, say so plainly. Be brief. The time now is {now} (UTC)."""


class Assistant:
    def __init__(self, open_view: OpenView, *, model: str | None = None, call_model: ModelCall | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        if model and call_model is None:
            raise ValueError("an assistant model needs a way to call it")
        self.open_view = open_view
        self.model = model or None
        self.call_model = call_model
        self.clock = clock

    async def respond(self, turn: Turn, emit: Emit) -> Reply:
        user_id = turn.actor.user_id or ""
        toolbox = Toolbox(self.open_view, user_id, turn.project_id, self.clock)
        reply = await (self._agent(turn, toolbox) if self.model else self._builtin(turn, toolbox))
        for piece in _pieces(reply.text):
            await emit(piece)
        return reply

    # ------------------------------------------------------------ built-in
    async def _builtin(self, turn: Turn, toolbox: Toolbox) -> Reply:
        names = await toolbox.names()
        intent = intents.understand(turn.question.content, names, _previous(turn))
        data: dict[str, Any] = {"mode": "builtin", "project_id": turn.project_id, "intent": intent.tool,
                                "args": intent.args}
        if intent.tool is None:
            return Reply(text=intents.cannot_answer(), data=data)
        if intent.tool == "help":
            return Reply(text=intents.help_text(), data=data)
        result = await toolbox.call(intent.tool, dict(intent.args))
        data["figures"] = result
        project_name = await self._project_name(result.get("project_id") or turn.project_id)
        return Reply(text=intents.phrase(intent, result, project_name), data=data)

    async def _project_name(self, project_id: str) -> str:
        async with self.open_view() as view:
            return await view.project_name(project_id) or project_id

    # ------------------------------------------------------------ LLM agent
    async def _agent(self, turn: Turn, toolbox: Toolbox) -> Reply:
        assert self.model is not None and self.call_model is not None
        name = await self._project_name(turn.project_id)
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT.format(
            name=name, project_id=turn.project_id, now=iso(toolbox.now))}]
        messages += [{"role": m.role, "content": m.content} for m in turn.history
                     if m.status == "complete" and m.content]
        messages.append({"role": "user", "content": turn.question.content})
        used: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        tools = openai_tools()
        for _ in range(MAX_TOOL_ROUNDS):
            answer = await self.call_model(turn.project_id, turn.actor.label, messages, tools)
            calls.append({"request_id": answer.request_id, "cost_micros": answer.cost_micros})
            if not answer.tool_calls:
                text = _clean(answer.content).strip() or "I have no answer to that."
                break
            messages.append({"role": "assistant", "content": answer.content or None, "tool_calls": answer.tool_calls})
            for call in answer.tool_calls:
                function = call.get("function") or {}
                args = _arguments(function.get("arguments"))
                result = await toolbox.call(str(function.get("name")), args)
                used.append({"tool": function.get("name"), "args": args, "result": result})
                messages.append({"role": "tool", "tool_call_id": call.get("id"),
                                 "content": msgspec.json.encode(for_model(result)).decode()})
        else:
            text = f"I could not finish the answer within {MAX_TOOL_ROUNDS} model calls."
        return Reply(text=text, data={"mode": "llm", "model": self.model, "project_id": turn.project_id,
                                      "figures": used, "model_requests": calls,
                                      "cost_micros": sum(c["cost_micros"] for c in calls)})


def _previous(turn: Turn) -> intents.Intent | None:
    for message in reversed(turn.history):
        if message.role == "assistant" and message.data and message.data.get("mode") == "builtin":
            return intents.Intent(tool=message.data.get("intent"), args=message.data.get("args") or {})
    return None


def _arguments(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        try:
            raw = msgspec.json.decode(raw or "{}")
        except (msgspec.DecodeError, TypeError):
            return {}
    return _clean(raw) if isinstance(raw, dict) else {}


def _clean(value: Any) -> Any:
    """What the model wrote, without NUL characters (PostgreSQL text and JSONB refuse them)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _pieces(text: str, words: int = 4) -> list[str]:
    """The answer in small deltas (a few words each) that join back to exactly the text."""
    tokens = re.findall(r"\S+\s*", text)
    lead = text[: len(text) - len(text.lstrip())]
    pieces = ["".join(tokens[i:i + words]) for i in range(0, len(tokens), words)] or [""]
    pieces[0] = lead + pieces[0]
    return pieces
