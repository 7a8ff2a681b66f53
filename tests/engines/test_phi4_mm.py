"""The local `phi4-mm` LLM stage on a tiny random Phi-4-multimodal: streamed text equals `generate()` (audio in the
prompt), stop strings and limits hold, loading errors name the path, and the cascade engine speaks its answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_phi4 import build_tiny_phi4

from omnivox.pipeline.engines.base import (
    AudioDelta,
    AudioPart,
    EngineError,
    Message,
    ResponseRequest,
    SamplingParams,
    TextDelta,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
)
from omnivox.pipeline.engines.cascade import CascadeEngine
from omnivox.pipeline.engines.phi4_mm import Phi4MmStage
from omnivox.pipeline.tts.stage import TtsStage
from tests.test_tts import FakeBackend


@pytest.fixture(scope="module")
def tiny_phi4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_phi4(tmp_path_factory.mktemp("tiny-phi4-mm"))


@pytest.fixture
async def stage(tiny_phi4_dir: Path) -> Phi4MmStage:
    loaded = Phi4MmStage(str(tiny_phi4_dir), device="cpu", max_text_tokens=40)
    await loaded.start()
    yield loaded
    await loaded.close()


def caller_audio(seconds: float = 1.5) -> np.ndarray:
    return (0.1 * np.random.default_rng(1).standard_normal(int(seconds * 16_000))).astype(np.float32)


def question(**sampling: object) -> ResponseRequest:
    turn = Message("user", (AudioPart(caller_audio()), TextPart("What did I say?")))
    return ResponseRequest(
        messages=(turn,), instructions="Be brief.", output_audio=False, sampling=SamplingParams(**sampling)
    )


def generate_reference(stage: Phi4MmStage, request: ResponseRequest, max_new_tokens: int) -> str:
    prepared = stage.prepare(request)
    with torch.inference_mode():
        output = stage.model.generate(**prepared.inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, prepared.inputs["input_ids"].shape[1] :].tolist()
    eos = [i for i, token in enumerate(new) if token in stage.eos_ids]
    return stage.tokenizer.decode(new[: eos[0]] if eos else new, skip_special_tokens=True)


def test_function_calls_and_results_are_left_out_of_the_prompt() -> None:
    """phi4-mm does not call tools; `<|tool|>` opens the model's list of tools and must not head a result."""
    stage = Phi4MmStage("not-loaded", device="cpu")
    messages = (
        Message("user", (TextPart("Weather?"),)),
        Message("assistant", (TextPart("Checking."), ToolCallPart("call_1", "get_weather", "{}"))),
        Message("tool", (ToolResultPart("call_1", "21 degrees", "get_weather"),)),
    )
    text, _, _ = stage.prompt(ResponseRequest(messages=messages))
    assert text == "<|user|>Weather?<|end|><|assistant|>Checking.<|end|><|assistant|>"


@pytest.mark.slow
async def test_streamed_text_equals_generate_with_audio_in_the_prompt(stage: Phi4MmStage) -> None:
    request = question(max_tokens=40)
    deltas = [delta async for delta in stage.stream(request)]
    texts = [d.text for d in deltas if isinstance(d, TextDelta)]
    assert len(texts) > 5, "the text did not stream"
    assert "".join(texts) == generate_reference(stage, request, 40)
    usage = deltas[-1]
    assert isinstance(usage, Usage) and usage.output_tokens == 40
    prompt = stage.prepare(request).inputs
    assert usage.input_tokens == prompt["input_ids"].shape[1]
    assert int((prompt["input_ids"] == stage.tokenizer.convert_tokens_to_ids("<|audio|>")).sum()) == int(
        prompt["audio_embed_sizes"][0]
    )


@pytest.mark.slow
async def test_stop_strings_end_the_answer_before_them(stage: Phi4MmStage) -> None:
    full = "".join([d.text async for d in stage.stream(question(max_tokens=30)) if isinstance(d, TextDelta)])
    stop = full[10:13]
    cut = "".join(
        [d.text async for d in stage.stream(question(max_tokens=30, stop=(stop,))) if isinstance(d, TextDelta)]
    )
    assert cut == full[: full.index(stop)]


def test_a_missing_checkpoint_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "Phi-4-multimodal-instruct"
    missing.mkdir()
    stage = Phi4MmStage(str(missing), device="cpu")
    with pytest.raises(EngineError, match=r"Phi-4-multimodal-instruct.*missing: config\.json"):
        stage.load()
    with pytest.raises(EngineError, match="unknown engine option"):
        Phi4MmStage(str(missing), temperature=0.5)


@pytest.mark.slow
async def test_the_cascade_engine_speaks_what_phi4_mm_streams(tiny_phi4_dir: Path) -> None:
    llm = Phi4MmStage(str(tiny_phi4_dir), device="cpu", max_text_tokens=30)
    engine = CascadeEngine(str(tiny_phi4_dir), tts=TtsStage(FakeBackend()), llm=llm, recogniser={"kind": "llm"})
    await engine.start()
    try:
        request = ResponseRequest(question().messages, output_audio=True)
        deltas = [delta async for delta in engine.respond(request)]
        reference = generate_reference(llm, ResponseRequest(request.messages, output_audio=False), 30)
        transcript = await engine.transcribe(caller_audio())
    finally:
        await engine.close()
    text = "".join(d.text for d in deltas if isinstance(d, TextDelta))
    assert text == reference and any(isinstance(d, AudioDelta) for d in deltas)
    assert isinstance(transcript, str)
