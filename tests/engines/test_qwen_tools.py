"""Function calling in both Qwen-Omni engines, on tiny random models: the tools in the prompt (chat template or
Hermes format), the thinker's `<tool_call>` text parsed into calls as it streams, and the talker never hearing it.

A random thinker will not write a call by itself, so the answer's tokens are forced (the mechanism a `required`
tool choice uses): the same forced speech with and without a call after it must give the very same audio, which
shows that not one token of the call reached the talker.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_qwen3 import build_tiny_qwen3

from omnivox.pipeline.engines.base import (
    AudioDelta,
    AudioPart,
    Delta,
    FunctionTool,
    Message,
    ResponseRequest,
    SamplingParams,
    TextDelta,
    TextPart,
    ToolCallDelta,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
)
from omnivox.pipeline.engines.qwen2_5_omni import Qwen25OmniEngine
from omnivox.pipeline.engines.qwen3_omni import Qwen3OmniEngine
from omnivox.pipeline.engines.qwen_common import PromptBuilder, QwenOmniEngine

WEATHER = FunctionTool(
    "get_weather",
    "The current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
GREEDY_TALKER = {"talker_temperature": 0.0, "talker_repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def qwen2_5(tiny_qwen2_5_dir: Path) -> Iterator[QwenOmniEngine]:
    engine = Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", max_audio_codes=40, **GREEDY_TALKER)
    engine.load()
    yield engine


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QwenOmniEngine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in test_qwen3_omni: the tiny model only slows down with more threads
    try:
        engine = Qwen3OmniEngine(
            str(build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-tools"))),
            device="cpu",
            max_audio_frames=16,  # more than the forced speech has tokens: the talker reaches the call
            **GREEDY_TALKER,
        )
        engine.load()
        yield engine
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=["qwen2.5-omni", "qwen3-omni"])
def engine(request: pytest.FixtureRequest) -> QwenOmniEngine:
    return request.getfixturevalue("qwen2_5" if request.param == "qwen2.5-omni" else "qwen3")


def asking(*, choice: ToolChoice | None = None, messages: tuple[Message, ...] = ()) -> ResponseRequest:
    t = np.arange(16_000) / 16_000
    question = Message("user", (AudioPart((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)),))
    return ResponseRequest(
        messages=messages or (question,),
        instructions="Use the tools.",
        voice="Ethan",
        sampling=SamplingParams(temperature=0.0, seed=0),
        tools=(WEATHER,),
        tool_choice=choice or ToolChoice(),
    )


def forced_answer(engine: QwenOmniEngine, text: str, request: ResponseRequest | None = None) -> list[Delta]:
    """Run one generation whose thinker writes exactly `text` and then ends."""
    tokenizer = engine.tokenizer
    ids = [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    plan = replace(engine.prepare(request or asking()), forced_ids=tuple(ids), max_text_tokens=len(ids) + 1)
    generation = engine.make_generation(plan)
    deltas: list[Delta] = []
    while not generation.finished:
        deltas += generation.step()
    return deltas


def spoken(deltas: list[Delta]) -> str:
    return "".join(delta.text for delta in deltas if isinstance(delta, TextDelta))


def audio(deltas: list[Delta]) -> np.ndarray:
    chunks = [delta.pcm for delta in deltas if isinstance(delta, AudioDelta)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def calls(deltas: list[Delta]) -> list[ToolCallDelta]:
    return [delta for delta in deltas if isinstance(delta, ToolCallDelta)]


def talker_inputs(
    engine: QwenOmniEngine, monkeypatch: pytest.MonkeyPatch, text: str
) -> tuple[list[Delta], list[torch.Tensor]]:
    """The answer to forced `text`, and every input its talker decode steps were given (text slots included)."""
    decoder_class = type(engine.growing_caches())
    seen: list[torch.Tensor] = []
    original = decoder_class.talker_step

    def recording(self: object, *args: object) -> object:
        seen.append(torch.cat([arg.reshape(-1) for arg in args if isinstance(arg, torch.Tensor)]).clone())
        return original(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(decoder_class, "talker_step", recording)
        return forced_answer(engine, text), seen


@pytest.mark.slow
def test_words_before_a_call_are_spoken_and_not_one_token_of_the_call(
    engine: QwenOmniEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_call, heard_with_call = talker_inputs(engine, monkeypatch, "Sure." + CALL)
    without, heard_without = talker_inputs(engine, monkeypatch, "Sure.")
    assert spoken(with_call) == spoken(without) == "Sure."
    assert calls(with_call) == [ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}')]
    assert audio(without).size > 0
    # the talker was given exactly what it is given when the answer ends after "Sure.", step for step
    assert len(heard_with_call) == len(heard_without) > len("Sure.")
    assert all(torch.equal(a, b) for a, b in zip(heard_with_call, heard_without, strict=True))
    np.testing.assert_array_equal(audio(with_call), audio(without))


def test_an_answer_that_is_only_a_call_makes_no_audio(engine: QwenOmniEngine) -> None:
    deltas = forced_answer(engine, CALL)
    assert calls(deltas) == [ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}')]
    assert spoken(deltas) == "" and audio(deltas).size == 0


def test_a_malformed_call_is_a_failed_call_not_speech(engine: QwenOmniEngine) -> None:
    deltas = forced_answer(engine, '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>')
    (call,) = calls(deltas)
    assert call.error is not None and "not valid JSON" in call.error
    assert spoken(deltas) == "" and audio(deltas).size == 0


def test_tool_choice_forces_or_forbids_the_call_token(engine: QwenOmniEngine) -> None:
    tokenizer = engine.tokenizer
    call_token = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert engine.prepare(asking(choice=ToolChoice("none"))).suppressed_ids == (call_token,)
    assert engine.prepare(asking(choice=ToolChoice("required"))).forced_ids == (call_token,)
    named = engine.prepare(asking(choice=ToolChoice("required", "get_weather"))).forced_ids
    assert tokenizer.decode(named) == '<tool_call>\n{"name": "get_weather", "arguments": '
    assert engine.prepare(asking()).forced_ids == ()


def history() -> tuple[Message, ...]:
    return (
        Message("user", (TextPart("What is the weather in Paris?"),)),
        Message("assistant", (TextPart("Let me check."), ToolCallPart("call_1", "get_weather", '{"city": "Paris"}'))),
        Message("tool", (ToolResultPart("call_1", '{"temperature": 21}', "get_weather"),)),
        Message("tool", (ToolResultPart("call_2", "sunny", "get_weather"),)),
    )


def prompt_of(engine: QwenOmniEngine, request: ResponseRequest, builder: PromptBuilder | None = None) -> str:
    builder = builder or engine._prompts
    assert builder is not None
    return engine.tokenizer.decode(builder.build(request).input_ids[0])


def test_hermes_prompt_offers_the_tools_and_holds_calls_and_results(engine: QwenOmniEngine) -> None:
    prompt = prompt_of(engine, asking(messages=history()))
    turns = prompt.split("<|im_end|>\n")
    official = engine._prompts.system_prompt if engine._prompts is not None else ""
    if official:  # the model's own prompt stays the first turn byte for byte; the offer goes in a turn after it
        assert turns[0] == f"<|im_start|>system\n{official}"
    system = next(turn for turn in turns if "<tools>" in turn)
    assert system.startswith("<|im_start|>system\n") and "Use the tools." in system
    offered = json.loads(system.split("<tools>\n")[1].split("\n</tools>")[0])
    assert offered == {
        "type": "function",
        "function": {"name": "get_weather", "description": WEATHER.description, "parameters": dict(WEATHER.parameters)},
    }
    assert f"<|im_start|>assistant\nLet me check.\n{CALL}<|im_end|>" in prompt
    results = '<tool_response>\n{"temperature": 21}\n</tool_response>\n<tool_response>\nsunny\n</tool_response>'
    assert f"<|im_start|>user\n{results}<|im_end|>\n<|im_start|>assistant\n" in prompt
    plain = prompt_of(engine, replace(asking(messages=history()), tool_choice=ToolChoice("none")))
    assert "<tools>" not in plain and CALL in plain  # no tools on offer, the history still holds the call


TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS {% for tool in tools %}{{ tool.function.name }} {% endfor %}"
    "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role != 'system' or not tools %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for call in m.tool_calls or [] %}CALL {{ call.function.name }} {{ call.function.arguments | tojson }}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A small chat template that renders tools, as Qwen3-Omni's does (the tiny tokenizers have none)."""


def test_a_chat_template_that_renders_tools_is_used_for_them(engine: QwenOmniEngine) -> None:
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = TEMPLATE
    assert engine._prompts is not None
    builder = PromptBuilder(tokenizer, engine._prompts.format, system_prompt=engine._prompts.system_prompt)
    assert builder.template_has_tools
    prompt = prompt_of(engine, asking(messages=history()), builder)
    assert prompt.startswith("<|im_start|>system\nTOOLS get_weather ")
    assert 'CALL get_weather {"city": "Paris"}' in prompt
    assert '<|im_start|>tool\n{"temperature": 21}<|im_end|>' in prompt
    assert "<tools>" not in prompt
    without_tools = ResponseRequest(messages=(Message("user", (TextPart("Hello"),)),))
    assert prompt_of(engine, without_tools, builder) == prompt_of(engine, without_tools)  # no tools: as before


def test_the_engines_know_their_context_for_truncation(engine: QwenOmniEngine) -> None:
    assert engine.context_tokens == engine.model.config.thinker_config.text_config.max_position_embeddings
    assert engine.audio_tokens_per_second == (12.5 if isinstance(engine, Qwen3OmniEngine) else 25.0)
