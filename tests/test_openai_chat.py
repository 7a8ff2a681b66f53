"""The OpenAI-compatible streaming chat client: requests per dialect, chunk shapes per dialect, errors, and the SSE
stream read from an HTTP transport in arbitrary byte pieces."""

from __future__ import annotations

import base64
import gc
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from omnivox.pipeline.audio import encode_audio_file, float_to_pcm16
from omnivox.pipeline.engines import openai_chat
from omnivox.pipeline.engines.base import (
    AudioPart,
    EngineBusy,
    EngineError,
    EngineNotReady,
    EngineOutOfMemory,
    FunctionTool,
    ImagePart,
    Message,
    ResponseRequest,
    SamplingParams,
    TextPart,
    ToolCallDelta,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
    Usage,
)
from omnivox.pipeline.engines.openai_chat import (
    AudioEncodings,
    ChatAudio,
    ChatClient,
    ChatOptions,
    ChatText,
    ChatUsage,
    HostUnreachable,
    InvalidToolCall,
    build_chat_body,
    encode_chat_body,
    stream_events,
    whole_events,
)
from omnivox.pipeline.media import AudioLimits, decode_audio_native

TONE = (0.3 * np.sin(np.arange(2_400) / 24_000 * 2 * np.pi * 440)).astype(np.float32)
"""100 ms at 24 kHz."""


def conversation_request(**changes: Any) -> ResponseRequest:
    caller = np.linspace(-0.5, 0.5, 16_000, dtype=np.float32)
    fields: dict[str, Any] = {
        "messages": (
            Message("user", (AudioPart(caller), TextPart("and this picture?"), ImagePart(b"\x89PNG", "image/png"))),
            Message("assistant", (TextPart("It is sunny"),)),
            Message("user", (TextPart("thanks"),)),
        ),
        "instructions": "Be brief.",
        "voice": "echo",
        "sampling": SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_tokens=64, seed=3, stop=("\n\n",)),
        "conversation_id": "sess_1",
    }
    return ResponseRequest(**{**fields, **changes})


def wav_b64(samples: np.ndarray, rate: int = 24_000) -> str:
    return base64.b64encode(encode_audio_file(samples, rate, "wav")).decode()


# ---------------------------------------------------------------- requests


def test_omnivox_request_carries_instructions_and_conversation_for_the_host() -> None:
    body = build_chat_body(conversation_request(), ChatOptions(model="omni", dialect="omnivox"))
    assert body["instructions"] == "Be brief."
    assert body["prompt_cache_key"] == "sess_1"
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["modalities"] == ["text", "audio"] and body["audio"] == {"voice": "echo", "format": "pcm16"}
    assert (body["stream"], body["stream_options"]) == (True, {"include_usage": True})
    assert {key: body[key] for key in ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop")} == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "max_tokens": 64,
        "seed": 3,
        "stop": ["\n\n"],
    }
    audio, text, image = body["messages"][0]["content"]
    assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav"
    samples, rate = decode_audio_native(
        base64.b64decode(audio["input_audio"]["data"]), allowed=("wav",), limits=AudioLimits(60)
    )
    assert (rate, samples.size) == (16_000, 16_000)
    assert text == {"type": "text", "text": "and this picture?"}
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert body["messages"][1] == {"role": "assistant", "content": "It is sunny"}


def test_vllm_omni_request_uses_audio_urls_a_system_message_and_a_top_level_voice() -> None:
    options = ChatOptions(
        model="Qwen/Qwen3-Omni", dialect="vllm-omni", system_prompt="You are Qwen.", voices={"echo": "Ethan"}
    )
    body = build_chat_body(conversation_request(), options)
    assert body["messages"][0] == {"role": "system", "content": "You are Qwen.\n\nBe brief."}
    audio = body["messages"][1]["content"][0]
    assert audio["type"] == "audio_url" and audio["audio_url"]["url"].startswith("data:audio/wav;base64,UklGR")
    assert body["voice"] == "Ethan" and "audio" not in body
    assert "prompt_cache_key" not in body and "instructions" not in body
    unmapped = build_chat_body(conversation_request(voice="alloy"), options)
    assert "voice" not in unmapped  # the server's default speaker rather than a refused name


def test_openai_request_and_text_only_requests() -> None:
    options = ChatOptions(model="gpt-4o-audio-preview", dialect="openai", extra_body={"store": False})
    body = build_chat_body(conversation_request(), options)
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body and "top_k" not in body
    assert body["prompt_cache_key"] == "sess_1" and body["store"] is False
    text_only = build_chat_body(conversation_request(output_audio=False), options)
    assert "modalities" not in text_only and "audio" not in text_only
    omnivox_text = build_chat_body(conversation_request(output_audio=False), ChatOptions("m", dialect="omnivox"))
    assert omnivox_text["modalities"] == ["text"]


WEATHER = FunctionTool("get_weather", "The weather in a city", {"type": "object", "properties": {"city": {}}})


def tool_turns(**changes: Any) -> ResponseRequest:
    """A conversation with two answered calls and two unanswered ones, offering one tool."""
    fields: dict[str, Any] = {
        "messages": (
            Message("user", (TextPart("Weather in Paris and Rome?"),)),
            Message(
                "assistant",
                (
                    TextPart("Let me look."),
                    ToolCallPart("call_1", "get_weather", '{"city": "Paris"}'),
                    ToolCallPart("call_2", "get_weather", '{"city": "Rome"}'),
                ),
            ),
            Message("tool", (ToolResultPart("call_1", '{"temperature": 21}', "get_weather"),)),
            Message("tool", (ToolResultPart("call_2", '{"temperature": 25}', "get_weather"),)),
            Message("assistant", (TextPart("Anything else?"), ToolCallPart("call_3", "get_weather", "{}"))),
            Message("user", (TextPart("No."),)),
            Message("assistant", (ToolCallPart("call_4", "get_weather", "{}"),)),
        ),
        "tools": (WEATHER,),
    }
    return ResponseRequest(**{**fields, **changes})


@pytest.mark.parametrize("dialect", ["omnivox", "openai", "vllm-omni"])
def test_tools_calls_and_results_go_in_the_openai_shape(dialect: str) -> None:
    body = build_chat_body(tool_turns(), ChatOptions(model="m", dialect=dialect))
    function = {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER.parameters}
    assert body["tools"] == [{"type": "function", "function": function}]
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("auto", True)
    user, spoken_and_calls, first, second, spoken_only, last = body["messages"]
    assert user == {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]}
    assert spoken_and_calls == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ],
    }
    assert first == {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}
    assert second == {"role": "tool", "tool_call_id": "call_2", "content": '{"temperature": 25}'}
    # calls no output answered are left out (OpenAI refuses them), and with them a turn that was only such calls
    assert spoken_only == {"role": "assistant", "content": "Anything else?"}
    assert last == {"role": "user", "content": [{"type": "text", "text": "No."}]}


def test_tool_choice_and_parallel_calls_are_sent_as_asked_and_nothing_without_tools() -> None:
    options = ChatOptions(model="m", dialect="openai")
    named = build_chat_body(tool_turns(tool_choice=ToolChoice("required", "get_weather")), options)
    assert named["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    single = build_chat_body(tool_turns(tool_choice=ToolChoice("none"), parallel_tool_calls=False), options)
    assert (single["tool_choice"], single["parallel_tool_calls"]) == ("none", False)
    assert build_chat_body(tool_turns(tool_choice=ToolChoice("required")), options)["tool_choice"] == "required"
    plain = build_chat_body(conversation_request(), options)
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(plain)


# ---------------------------------------------------------------- chunks


def test_openai_chunks_give_transcript_audio_and_usage() -> None:
    pcm = base64.b64encode(float_to_pcm16(TONE)).decode()
    events = stream_events({"choices": [{"index": 0, "delta": {"audio": {"id": "a", "transcript": "Hi"}}}]}, "openai")
    assert events == [ChatText("Hi")]
    (audio,) = stream_events({"choices": [{"index": 0, "delta": {"audio": {"id": "a", "data": pcm}}}]}, "omnivox")
    assert isinstance(audio, ChatAudio) and audio.rate == 24_000
    np.testing.assert_allclose(audio.pcm, TONE, atol=1 / 32768)
    usage = {"prompt_tokens": 30, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 20}}
    assert stream_events({"choices": [], "usage": usage}, "openai") == [ChatUsage(Usage(30, 5, 20))]
    assert stream_events({"choices": [{"index": 0, "delta": {"content": "text"}}]}, "openai") == [ChatText("text")]


def test_vllm_omni_chunks_name_their_modality_and_carry_wav_files() -> None:
    text = {"modality": "text", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}}]}
    assert stream_events(text, "vllm-omni") == [ChatText("Hello")]
    audio_chunk = {
        "modality": "audio",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": wav_b64(TONE)}, "finish_reason": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12},
    }
    audio, usage = stream_events(audio_chunk, "vllm-omni")
    assert isinstance(audio, ChatAudio) and audio.rate == 24_000 and audio.pcm.size == TONE.size
    assert usage == ChatUsage(Usage(12, 0, 0))
    empty = {"modality": "audio", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert stream_events(empty, "vllm-omni") == []


def test_a_whole_reply_at_once_gives_text_before_audio() -> None:
    body = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello there"}},
            {
                "index": 0,
                "message": {"role": "assistant", "audio": {"id": "audio-1", "data": wav_b64(TONE), "transcript": ""}},
            },
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3},
    }
    text, audio, usage = whole_events(body)
    assert text == ChatText("Hello there") and isinstance(audio, ChatAudio) and audio.pcm.size == TONE.size
    assert usage == ChatUsage(Usage(9, 3, 0))
    openai_shape = {"choices": [{"message": {"content": None, "audio": {"data": "", "transcript": "Hi"}}}]}
    assert whole_events(openai_shape) == [ChatText("Hi")]


def tool_chunk(*calls: dict[str, Any], modality: str | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {"choices": [{"index": 0, "delta": {"tool_calls": list(calls)}, "finish_reason": None}]}
    return {**chunk, "modality": modality} if modality else chunk


@pytest.mark.parametrize("dialect", ["omnivox", "openai", "vllm-omni"])
def test_streamed_tool_call_pieces_become_tool_call_deltas(dialect: str) -> None:
    modality = "text" if dialect == "vllm-omni" else None
    first = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    assert stream_events(tool_chunk(first, modality=modality), dialect) == [
        ToolCallDelta(0, name="get_weather", call_id="call_a")
    ]
    piece = {"index": 0, "function": {"arguments": '{"city": '}}
    second = {"index": 1, "id": "call_b", "function": {"name": "get_time", "arguments": "{}"}}
    assert stream_events(tool_chunk(piece, second, modality=modality), dialect) == [
        ToolCallDelta(0, arguments='{"city": '),
        ToolCallDelta(1, name="get_time", arguments="{}", call_id="call_b"),
    ]


def test_hostile_tool_call_pieces_are_bounded() -> None:
    with pytest.raises(EngineError, match="index"):
        stream_events(tool_chunk({"index": 10**9, "function": {"name": "x"}}), "openai")
    with pytest.raises(EngineError, match="index"):
        stream_events(tool_chunk({"index": "0", "function": {"name": "x"}}), "openai")
    odd = {"index": 0, "id": "c" * 500, "function": {"name": 7, "arguments": {"city": "Paris"}}}
    assert stream_events(tool_chunk(odd, "not a call"), "openai") == [ToolCallDelta(0, arguments='{"city": "Paris"}')]


def test_a_whole_reply_gives_its_calls_after_the_text_and_before_the_audio() -> None:
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]
    body = {
        "choices": [
            {"message": {"role": "assistant", "content": "Let me look.", "tool_calls": calls}},
            {"message": {"role": "assistant", "audio": {"id": "a", "data": wav_b64(TONE), "transcript": ""}}},
        ]
    }
    text, first, second, audio = whole_events(body)
    assert text == ChatText("Let me look.") and isinstance(audio, ChatAudio)
    assert (first, second) == (
        ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}', call_id="call_a"),
        ToolCallDelta(1, name="get_weather", arguments='{"city": "Rome"}', call_id="call_b"),
    )


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ({"error": {"message": "busy", "code": "server_busy"}}, EngineBusy),
        ({"error": {"message": "oom", "type": "server_error", "code": "engine_out_of_memory"}}, EngineOutOfMemory),
        ({"error": {"message": "loading", "code": "engine_not_ready"}}, EngineNotReady),
        ({"object": "error", "message": "boom", "type": "InternalServerError", "code": 500}, EngineError),
    ],
)
def test_an_error_chunk_raises_its_engine_error_kind(error: dict[str, Any], kind: type[EngineError]) -> None:
    with pytest.raises(kind) as raised:
        stream_events(error, "vllm-omni")
    assert type(raised.value) is kind


def test_undecodable_audio_is_an_engine_error() -> None:
    chunk = {"choices": [{"delta": {"audio": {"data": "not base64!"}}}]}
    with pytest.raises(EngineError, match="cannot be decoded"):
        stream_events(chunk, "openai")


# ---------------------------------------------------------------- HTTP


def sse(*payloads: dict[str, Any] | str) -> bytes:
    return b"".join(
        f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode() for payload in payloads
    )


class Pieces(httpx.AsyncByteStream):
    """A body delivered in small pieces that split lines and events anywhere."""

    def __init__(self, body: bytes, size: int) -> None:
        self.body = body
        self.size = size

    async def __aiter__(self) -> Iterator[bytes]:  # type: ignore[override]
        for start in range(0, len(self.body), self.size):
            yield self.body[start : start + self.size]


def client_for(handler: Any, dialect: str = "omnivox", **options: Any) -> ChatClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return ChatClient(http, "http://engine-host:8000/v1/", ChatOptions(model="m", dialect=dialect), **options)


async def collect(client: ChatClient, request: ResponseRequest | None = None) -> list[Any]:
    return [event async for event in client.stream(request or conversation_request())]


async def test_the_stream_is_read_across_any_split_until_done() -> None:
    seen: list[httpx.Request] = []
    pcm = base64.b64encode(float_to_pcm16(TONE)).decode()
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "audio": {"id": "a", "transcript": ""}}}]},
        {"choices": [{"index": 0, "delta": {"audio": {"id": "a", "transcript": "Hello"}}}]},
        {"choices": [{"index": 0, "delta": {"audio": {"id": "a", "data": pcm}}}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}},
        "[DONE]",
        {"choices": [{"index": 0, "delta": {"content": "after done: never read"}}]},
    ).replace(b"\n", b"\r\n")

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Pieces(body, 7))

    client = client_for(handler, api_key="sk-host")
    events = await collect(client)
    assert [type(event) for event in events] == [ChatText, ChatAudio, ChatUsage]
    assert events[0] == ChatText("Hello") and events[1].pcm.size == TONE.size
    (request,) = seen
    assert str(request.url) == "http://engine-host:8000/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-host"
    assert json.loads(request.content)["prompt_cache_key"] == "sess_1"


async def test_a_json_body_is_read_as_a_whole_reply() -> None:
    whole = {"choices": [{"message": {"content": "All at once"}}], "usage": {"prompt_tokens": 2}}
    client = client_for(lambda _: httpx.Response(200, json=whole), dialect="vllm-omni")
    assert await collect(client) == [ChatText("All at once"), ChatUsage(Usage(2, 0, 0))]


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (429, {"error": {"message": "too many", "code": "server_busy"}}, EngineBusy),
        (503, {"error": {"message": "loading", "code": "engine_not_ready"}}, EngineNotReady),
        (503, {"error": {"message": "oom", "code": "engine_out_of_memory"}}, EngineOutOfMemory),
        (500, {"object": "error", "message": "bad", "type": "InternalServerError", "code": 500}, EngineError),
        (404, {"error": {"message": "the model 'm' does not exist", "code": "model_not_found"}}, EngineError),
    ],
)
async def test_refusals_become_engine_error_kinds(status: int, body: dict[str, Any], kind: type[EngineError]) -> None:
    client = client_for(lambda _: httpx.Response(status, json=body))
    with pytest.raises(kind) as raised:
        await collect(client)
    assert type(raised.value) is kind
    assert (body.get("error") or body)["message"] in str(raised.value)


async def test_an_error_mid_stream_ends_it_with_its_kind() -> None:
    body = sse(
        {"choices": [{"delta": {"content": "Hel"}}]}, {"error": {"message": "oom", "code": "engine_out_of_memory"}}
    )
    client = client_for(lambda _: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body))
    received = []
    with pytest.raises(EngineOutOfMemory):
        async for event in client.stream(conversation_request()):
            received.append(event)
    assert received == [ChatText("Hel")]


def streamed(*payloads: dict[str, Any] | str) -> Any:
    body = sse(*payloads)
    return lambda _: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


@pytest.mark.parametrize("dialect", ["omnivox", "openai", "vllm-omni"])
async def test_after_the_first_call_piece_no_text_and_for_vllm_omni_no_audio(dialect: str) -> None:
    """The text after a call is the call's (the engine protocol); vLLM-Omni's talker would speak the call."""
    audio_text = {"modality": "text"} if dialect == "vllm-omni" else {}
    audio_chunk = (
        {"modality": "audio", "choices": [{"delta": {"content": wav_b64(TONE)}}]}
        if dialect == "vllm-omni"
        else {"choices": [{"delta": {"audio": {"data": base64.b64encode(float_to_pcm16(TONE)).decode()}}}]}
    )
    call = {"index": 0, "id": "call_a", "function": {"name": "get_weather", "arguments": "{}"}}
    client = client_for(
        streamed(
            {**audio_text, "choices": [{"delta": {"content": "Let me look."}}]},
            audio_chunk,
            {**tool_chunk(call), **audio_text},
            {**audio_text, "choices": [{"delta": {"content": '<tool_call>{"name": "get_weather"}'}}]},
            audio_chunk,
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        ),
        dialect=dialect,
    )
    events = await collect(client, tool_turns())
    kinds = [type(event).__name__ for event in events]
    expected_after = ["ChatUsage"] if dialect == "vllm-omni" else ["ChatAudio", "ChatUsage"]
    assert kinds == ["ChatText", "ChatAudio", "ToolCallDelta", *expected_after]
    assert events[0] == ChatText("Let me look.")


async def test_a_call_the_host_refuses_after_streaming_it_fails_as_a_call() -> None:
    call = {"index": 0, "id": "call_a", "function": {"name": "get_weather", "arguments": '{"city": "Par'}}
    refusal = {"error": {"message": "the model made an invalid function call", "code": "invalid_tool_call"}}
    events = await collect(client_for(streamed(tool_chunk(call), refusal)), tool_turns())
    assert events == [
        ToolCallDelta(0, name="get_weather", arguments='{"city": "Par', call_id="call_a"),
        ToolCallDelta(0, error="the model made an invalid function call"),
    ]
    with pytest.raises(InvalidToolCall):  # with no call begun it is the response's failure
        await collect(client_for(streamed(refusal)), tool_turns())


async def test_a_host_that_refuses_connections_is_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(HostUnreachable, match="unreachable"):
        await collect(client_for(refuse))


async def test_an_oversized_event_is_refused() -> None:
    body = sse({"choices": [{"delta": {"content": "x" * 5000}}]})
    client = client_for(
        lambda _: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body), max_event_bytes=1024
    )
    with pytest.raises(EngineError, match="exceeds 1024 bytes"):
        await collect(client)


# ---------------------------------------------------------------- encoding a turn


def test_a_turn_encodes_only_its_new_audio_and_the_body_is_the_same_json(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[int] = []
    original = openai_chat.wav_base64

    def counting(pcm: np.ndarray) -> str:
        encoded.append(pcm.size)
        return original(pcm)

    monkeypatch.setattr(openai_chat, "wav_base64", counting)
    first_clip, second_clip = np.full(8_000, 0.25, np.float32), np.full(4_000, -0.25, np.float32)
    encodings = AudioEncodings()
    # a caller's text that looks like a placeholder stays text
    first = ResponseRequest(messages=(Message("user", (AudioPart(first_clip), TextPart("00000000"))),))
    second = ResponseRequest(
        messages=(*first.messages, Message("assistant", (TextPart("ok"),)), Message("user", (AudioPart(second_clip),)))
    )
    for dialect in ("omnivox", "vllm-omni"):
        options = ChatOptions(model="m", dialect=dialect)
        for request in (first, second):
            body = encode_chat_body(request, options, encodings)
            assert json.loads(body) == build_chat_body(request, options)
    assert encoded[:2] == [8_000, 4_000] and len(encodings) == 2
    assert encodings.uncached_samples(second) == 0
    del first, second, request, first_clip
    gc.collect()
    assert len(encodings) == 1  # a clip that died (its conversation ended) is dropped


def test_the_encodings_are_bounded_in_bytes() -> None:
    clips = [np.zeros(16_000, np.float32) for _ in range(3)]
    encodings = AudioEncodings(max_bytes=2 * len(openai_chat.wav_base64(clips[0])))
    for clip in clips:
        encodings.get(clip)
    assert len(encodings) == 2 and encodings.cached(clips[0]) is None and encodings.cached(clips[2]) is not None
