"""OpenAI ⇄ Anthropic translation, both ways, as pure functions."""

from __future__ import annotations

import json

import pytest

from domain.errors import InvalidRequest
from domain.providers import ProviderCall, Usage
from server.providers.anthropic import StreamTranslator, finish_reason, from_anthropic, to_anthropic


def call(messages, **params) -> ProviderCall:
    return ProviderCall(provider="anthropic", model="claude-x", messages=messages,
                        max_tokens=params.pop("max_tokens", None), params=params)


def test_system_prompts_are_lifted_and_turns_merged():
    body = to_anthropic(call([
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "No emojis."}]},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": [{"type": "text", "text": "there"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]))
    assert body["system"] == "You are terse.\n\nNo emojis."
    assert body["max_tokens"] == 1024  # Anthropic requires it; the default applies
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    first = body["messages"][0]["content"]
    assert first[0] == {"type": "text", "text": "Hi"} and first[1] == {"type": "text", "text": "there"}
    assert first[2] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}


def test_params_stop_tools_and_tool_results():
    body = to_anthropic(call(
        [{"role": "user", "content": "weather?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Oslo"}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "3C"}],
        max_tokens=50, temperature=0.1, top_p=0.9, stop=["A", "B"], user="u1", tool_choice="required",
        tools=[{"type": "function", "function": {"name": "get", "description": "d",
                                                 "parameters": {"type": "object"}}}],
    ), stream=True)
    assert body["max_tokens"] == 50 and body["temperature"] == 0.1 and body["top_p"] == 0.9
    assert body["stop_sequences"] == ["A", "B"] and body["metadata"] == {"user_id": "u1"}
    assert body["tools"] == [{"name": "get", "description": "d", "input_schema": {"type": "object"}}]
    assert body["tool_choice"] == {"type": "any"} and body["stream"] is True
    assert body["messages"][1]["content"] == [{"type": "tool_use", "id": "call_1", "name": "get",
                                               "input": {"city": "Oslo"}}]
    assert body["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "3C"}]}


def test_bad_requests_are_invalid_request():
    with pytest.raises(InvalidRequest):
        to_anthropic(call([{"role": "system", "content": "only a system prompt"}]))
    with pytest.raises(InvalidRequest):
        to_anthropic(call([{"role": "wizard", "content": "x"}]))
    with pytest.raises(InvalidRequest):
        to_anthropic(call([{"role": "user", "content": [{"type": "input_audio"}]}]))


@pytest.mark.parametrize(("stop", "finish"), [("end_turn", "stop"), ("stop_sequence", "stop"),
                                              ("max_tokens", "length"), ("tool_use", "tool_calls"),
                                              ("refusal", "content_filter"), ("something_new", "stop")])
def test_stop_reasons(stop, finish):
    assert finish_reason(stop) == finish


def test_response_translation_with_cache_tokens_and_tool_use():
    body, usage = from_anthropic({
        "id": "msg_1", "type": "message", "model": "claude-x", "stop_reason": "tool_use",
        "content": [{"type": "text", "text": "Let me check. "},
                    {"type": "tool_use", "id": "tu_1", "name": "get", "input": {"city": "Oslo"}}],
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 2,
                  "output_tokens": 7}})
    assert usage == Usage(17, 7)
    assert body["object"] == "chat.completion" and body["id"] == "msg_1"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check. "
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert body["usage"] == {"prompt_tokens": 17, "completion_tokens": 7, "total_tokens": 24}


def test_stream_events_become_chunks():
    t = StreamTranslator("claude-x")
    events = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_9", "model": "claude-x-1",
                                                                "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hel"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "lo"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "tool_use", "id": "tu_1", "name": "get", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": '{"a":'}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                           "usage": {"output_tokens": 9}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    chunks = [c for name, data in events for c in t.feed(name, data)]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "msg_9" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello"
    tool = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
            if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert tool[0]["id"] == "tu_1" and tool[0]["index"] == 0 and tool[1]["function"]["arguments"] == '{"a":'
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 12
    assert t.usage == Usage(12, 9) and t.stopped
