"""Agent frameworks with tools against a real server, unmodified: `openai-agents` (RealtimeAgent with a
`@function_tool`), Pipecat's `OpenAIRealtimeLLMService` and LiveKit Agents' `RealtimeModel(base_url=...)`.

The caller asks a spoken question; the scripted engine recognises "weather" in it (pocketsphinx) and calls
`get_weather`; the framework runs its own function and sends the output back; the agent speaks the answer made from
that output.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from omnivox.pipeline.audio import pcm16_to_float
from tests.audio_fixtures import encode, silence, speech, stream_realtime
from tests.server_helpers import RunningServer, running_server
from tests.test_tools_doors import tool_config

QUESTION = "What is the weather like today?"
ANSWER = "It is 21 degrees in Paris."


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server(tool_config()) as running:
        yield running


def spoken_question(rate: int = 24_000) -> np.ndarray:
    return np.concatenate([silence(0.3, rate), speech(QUESTION, rate), silence(1.2, rate)])


@pytest.mark.slow
async def test_openai_agents_realtime_agent_calls_a_function_tool_and_speaks_its_result(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    from agents import function_tool
    from agents.realtime import RealtimeAgent, RealtimeRunner

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return json.dumps({"temperature": 21, "sky": "clear"})

    caplog.set_level(logging.ERROR, logger="openai.agents")
    agent = RealtimeAgent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather])
    config = {"url": f"{server.ws_url}/v1/realtime?model=gpt-realtime", "api_key": "sk-local"}
    session = await RealtimeRunner(agent).run(model_config=config)
    kinds: list[str] = []
    audio = bytearray()
    history: list[Any] = []
    async with session:
        sender = asyncio.create_task(stream_realtime(session.send_audio, encode(spoken_question())))
        async with asyncio.timeout(30):
            async for event in session:
                kinds.append(event.type)
                if event.type == "error":
                    pytest.fail(f"openai-agents reported an error: {event.error}")
                elif event.type == "history_updated":
                    history = event.history
                elif event.type == "audio" and "tool_end" in kinds:
                    audio += event.audio.data
                elif event.type == "agent_end" and audio:
                    break
        await sender
    assert calls == ["Paris"]
    assert kinds.index("tool_start") < kinds.index("tool_end") < kinds.index("audio")
    assert pcm16_to_float(bytes(audio)).size / 24_000 > 1.0
    transcripts = [
        part.transcript
        for item in history
        if getattr(item, "role", None) == "assistant"
        for part in item.content
        if getattr(part, "transcript", None)
    ]
    assert ANSWER in transcripts
    assert "Failed to validate server event" not in caplog.text


@pytest.mark.slow
async def test_livekit_realtime_model_runs_a_tool_against_omnivox(server: RunningServer) -> None:
    """LiveKit's OpenAI realtime plugin, pointed at omnivox with `base_url`: its programmatic turn
    (`generate_reply`, which sends `"instructions": null`), the function call, the output, the spoken answer."""
    pytest.importorskip("livekit.plugins.openai")
    from livekit.agents import llm
    from livekit.plugins.openai.realtime import RealtimeModel

    @llm.function_tool
    async def get_weather(city: str) -> str:
        """The current weather in a city."""
        return json.dumps({"temperature": 21, "sky": "clear"})

    model = RealtimeModel(base_url=f"{server.http_url}/v1", api_key="sk-local", model="gpt-realtime")
    session = model.session()
    errors: list[Any] = []
    session.on("error", errors.append)
    try:
        await session.update_tools([get_weather])
        chat = llm.ChatContext.empty()
        chat.add_message(role="user", content=QUESTION)
        await session.update_chat_ctx(chat)
        first = await asyncio.wait_for(session.generate_reply(), 15)
        calls = [call async for call in first.function_stream]
        async for message in first.message_stream:
            async for _ in message.audio_stream:
                pass
        assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": "Paris"})]
        output = await get_weather("Paris")
        chat = session.chat_ctx.copy()
        chat.insert(llm.FunctionCallOutput(call_id=calls[0].call_id, name="get_weather", output=output, is_error=False))
        await session.update_chat_ctx(chat)
        second = await asyncio.wait_for(session.generate_reply(), 15)
        transcript, samples = "", 0
        async for message in second.message_stream:
            async for piece in message.text_stream:
                transcript += piece
            async for frame in message.audio_stream:
                samples += frame.samples_per_channel
        assert transcript == ANSWER
        assert samples / 24_000 > 1.0
        session.interrupt()  # nothing active: LiveKit's cancel is answered with OpenAI's benign text
        await asyncio.sleep(0.3)
    finally:
        await session.aclose()
        await model.aclose()
    assert errors == []


@pytest.mark.slow
async def test_pipecat_realtime_service_runs_a_tool_against_omnivox(server: RunningServer) -> None:
    """Pipecat's `OpenAIRealtimeLLMService` in a pipeline with its context aggregators: the registered function
    runs, its result goes back as a `function_call_output`, the spoken answer comes out as TTS audio frames.
    Pipecat treats any error event as fatal, so this also shows the session sends none."""
    pytest.importorskip("pipecat")
    from pipecat.adapters.schemas.function_schema import FunctionSchema
    from pipecat.adapters.schemas.tools_schema import ToolsSchema
    from pipecat.frames.frames import (
        EndFrame,
        ErrorFrame,
        LLMContextFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
        TTSTextFrame,
    )
    from pipecat.observers.base_observer import BaseObserver, FramePushed
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.services.llm_service import FunctionCallParams
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
    from pipecat.workers.runner import WorkerRunner

    calls: list[dict[str, Any]] = []
    frames: dict[str, list[Any]] = {"audio": [], "text": [], "errors": []}
    answered = asyncio.Event()

    async def get_weather(params: FunctionCallParams) -> None:
        calls.append(dict(params.arguments))
        await params.result_callback({"temperature": 21, "sky": "clear"})

    class Recorder(BaseObserver):
        def __init__(self) -> None:
            super().__init__(observe_every_push=False)  # each frame once, not at every processor it passes

        async def on_push_frame(self, data: FramePushed) -> None:
            frame = data.frame
            if isinstance(frame, TTSAudioRawFrame) and calls:
                frames["audio"].append(frame)
            elif isinstance(frame, TTSTextFrame):
                frames["text"].append(frame.text)
            elif isinstance(frame, TTSStoppedFrame) and ANSWER in "".join(frames["text"]):
                answered.set()  # the answer's response.done: all its audio is out
            elif isinstance(frame, ErrorFrame):
                frames["errors"].append(frame.error)
                answered.set()

    llm = OpenAIRealtimeLLMService(
        api_key="sk-local",
        base_url=f"{server.ws_url}/v1/realtime",
        settings=OpenAIRealtimeLLMService.Settings(model="gpt-realtime"),
    )
    llm.register_function("get_weather", get_weather)
    weather = FunctionSchema(
        name="get_weather",
        description="The current weather in a city",
        properties={"city": {"type": "string"}},
        required=["city"],
    )
    context = LLMContext(messages=[{"role": "user", "content": QUESTION}], tools=ToolsSchema(standard_tools=[weather]))
    aggregators = LLMContextAggregatorPair(context)
    worker = PipelineWorker(
        Pipeline([aggregators.user(), llm, aggregators.assistant()]),
        observers=[Recorder()],
        cancel_on_idle_timeout=False,
    )
    runner = WorkerRunner()
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        await worker.queue_frame(LLMContextFrame(context))
        await asyncio.wait_for(answered.wait(), 20)
    finally:
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(running, 10)
    assert frames["errors"] == []
    assert calls == [{"city": "Paris"}]
    seconds = sum(len(frame.audio) for frame in frames["audio"]) / 2 / 24_000
    assert seconds > 1.0
