"""The Qwen3-Omni streaming engine on a tiny random model: the same answer as `generate()`, heard from the start."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_common import processor_audio
from tiny_qwen3 import build_tiny_qwen3
from transformers import PreTrainedTokenizerBase, Qwen3OmniMoeForConditionalGeneration
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

from omnivox.pipeline.engines import qwen3_omni
from omnivox.pipeline.engines.base import (
    AudioDelta,
    AudioPart,
    Delta,
    EngineError,
    ImagePart,
    Message,
    ResponseRequest,
    SamplingParams,
    TextDelta,
    TextPart,
    Usage,
)
from omnivox.pipeline.engines.qwen3_omni import (
    CausalCode2WavStream,
    Qwen3Generation,
    Qwen3OmniEngine,
    UnrolledCodePredictor,
    code2wav_receptive_field,
    decode_window,
    pick_tokens,
    step_generations,
)
from tests.image_fixtures import png_image

MAX_TEXT_TOKENS = 20
MAX_FRAMES = 30
SAMPLES_PER_FRAME = 1920
WINDOW_TAIL = 555
GREEDY = {"talker_temperature": 0.0, "talker_repetition_penalty": 1.0}


@dataclass
class Tiny:
    path: Path
    model: Qwen3OmniMoeForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase

    def engine(self, **options: Any) -> Qwen3OmniEngine:
        """An engine on the shared, already loaded tiny model (greedy codecs and test-sized limits by default)."""
        settings = {"device": "cpu", "max_audio_frames": MAX_FRAMES, **GREEDY, **options}
        engine = Qwen3OmniEngine(str(self.path), **settings)
        engine.install(self.model, self.tokenizer)
        return engine


@dataclass
class Reference:
    """What stock `generate()` makes of the same request, greedy."""

    text_ids: list[int]
    codes: torch.Tensor
    wav: np.ndarray


def replace_config(config: Any, **changes: Any) -> Any:
    """A copy of a sub-model config with some values changed."""
    return type(config)(**{**config.to_dict(), **changes})


def _tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _request(
    *messages: Message,
    voice: str = "Ethan",
    output_audio: bool = True,
    max_tokens: int = MAX_TEXT_TOKENS,
    **sampling: Any,
) -> ResponseRequest:
    return ResponseRequest(
        messages=messages or (Message("user", (AudioPart(_tone(1.5, 220)),)),),
        instructions="You are a helpful assistant.",
        voice=voice,
        output_audio=output_audio,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tiny]:
    """The tiny checkpoint, loaded once. Torch runs on one thread meanwhile: the model is too small to gain from
    more, and spinning intra-op threads slow it 15x when other processes share the two cores (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-omni"))
        loader = Qwen3OmniEngine(str(path), device="cpu")
        loader.load()
        yield Tiny(path, loader.model, loader.tokenizer)
    finally:
        torch.set_num_threads(threads)


def _generate(
    tiny: Tiny, request: ResponseRequest, *, text_tokens: int, frames: int, penalty: float = 1.0
) -> Reference:
    engine = tiny.engine()
    inputs = engine.prepare(request).inputs.tensors(torch.device("cpu"), torch.float32)
    vocoder_inputs: list[torch.Tensor] = []
    hook = tiny.model.code2wav.register_forward_pre_hook(lambda _module, args: vocoder_inputs.append(args[0]))
    try:
        sequences, wav = tiny.model.generate(
            **inputs,
            speaker="Ethan",
            thinker_max_new_tokens=text_tokens,
            thinker_do_sample=False,
            thinker_eos_token_id=sorted(engine.text_eos_ids),
            talker_max_new_tokens=frames + 1,  # its last code never gets residuals: N tokens make N-1 frames
            talker_do_sample=False,
            talker_repetition_penalty=penalty,
        )
    finally:
        hook.remove()
    prompt_length = inputs["input_ids"].shape[1]
    return Reference(sequences[0, prompt_length:].tolist(), vocoder_inputs[0][0], wav.reshape(-1).numpy())


@pytest.fixture(scope="module")
def reference(tiny: Tiny) -> Reference:
    return _generate(tiny, _request(), text_tokens=MAX_TEXT_TOKENS, frames=MAX_FRAMES)


@pytest.fixture(scope="module")
def streamed(tiny: Tiny) -> tuple[Qwen3Generation, list[list[Delta]]]:
    """The default request streamed step by step (greedy), with the deltas of every step."""
    generation = _generation(tiny)
    return generation, _run(generation)


def _generation(tiny: Tiny, request: ResponseRequest | None = None, **options: Any) -> Qwen3Generation:
    engine = tiny.engine(**options)
    return engine.make_generation(engine.prepare(request or _request()))


def _run(generation: Qwen3Generation) -> list[list[Delta]]:
    steps = []
    while not generation.finished:
        steps.append(generation.step())
    return steps


def _audio(steps: list[list[Delta]]) -> np.ndarray:
    return np.concatenate([d.pcm for deltas in steps for d in deltas if isinstance(d, AudioDelta)])


def _text(steps: list[list[Delta]]) -> str:
    return "".join(d.text for deltas in steps for d in deltas if isinstance(d, TextDelta))


def _codes(generation: Qwen3Generation) -> torch.Tensor:
    return torch.stack(generation.frames, dim=-1)


def test_stream_equals_generate_under_greedy_decoding(
    reference: Reference, streamed: tuple[Qwen3Generation, list[list[Delta]]]
) -> None:
    generation, steps = streamed

    assert generation.text_ids == reference.text_ids
    assert torch.equal(_codes(generation), reference.codes)
    assert _text(steps)  # random byte tokens: the text itself is noise, its ids are checked above
    usage = steps[-1][-1]
    assert isinstance(usage, Usage) and usage.output_tokens == MAX_TEXT_TOKENS


def test_a_stop_string_ends_the_answer_and_its_speech(
    tiny: Tiny, streamed: tuple[Qwen3Generation, list[list[Delta]]]
) -> None:
    free_text = _text(streamed[1])
    stop = free_text[len(free_text) // 2 :][:2]
    generation = _generation(tiny, _request(stop=(stop,)))
    steps = _run(generation)

    assert _text(steps) == free_text[: free_text.index(stop)]
    assert len(generation.text_ids) < MAX_TEXT_TOKENS
    assert _audio(steps).shape[0] == SAMPLES_PER_FRAME * len(generation.frames) - WINDOW_TAIL


@pytest.mark.parametrize("ending", ["max_tokens 1", "end of text", "stop string"])
def test_an_answer_whose_first_token_is_final_ends_at_once_without_speech(
    tiny: Tiny, reference: Reference, ending: str
) -> None:
    """The final text token is never spoken (generate() gives its slot tts_eos); when it is the first one there is
    nothing to say, so no talker runs, instead of one that never hears tts_eos and speaks to max_audio_frames."""
    engine = tiny.engine(max_audio_frames=MAX_FRAMES)
    first_token = {
        "max_tokens 1": reference.text_ids[0],
        "end of text": tiny.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "stop string": tiny.tokenizer.convert_tokens_to_ids("a"),
    }[ending]
    request = _request(max_tokens=1) if ending == "max_tokens 1" else _request(stop=("a",))
    generation = engine.make_generation(engine.prepare(request))
    if ending != "max_tokens 1":  # the random thinker's first word is noise: it says what the case needs instead
        generation._text_sampler = lambda logits, history: first_token  # type: ignore[assignment,method-assign]
    steps = _run(generation)

    assert len(steps) == 1
    assert generation.text_ids == [first_token]
    assert generation.frames == []
    assert not any(isinstance(d, AudioDelta) for d in steps[0])
    assert isinstance(steps[0][-1], Usage)


def test_a_multi_turn_conversation_equals_generate(tiny: Tiny) -> None:
    request = _request(
        Message("user", (AudioPart(_tone(1.0, 300)),)),
        Message("assistant", (TextPart("Sure, go on."),)),
        Message("user", (TextPart("Tell me more"), AudioPart(_tone(0.6, 180)))),
    )
    expected = _generate(tiny, request, text_tokens=MAX_TEXT_TOKENS, frames=12)
    generation = _generation(tiny, request, max_audio_frames=12)
    _run(generation)

    assert generation.text_ids == expected.text_ids
    assert torch.equal(_codes(generation), expected.codes)


def test_a_continued_conversation_encodes_only_its_new_turn_and_answers_as_if_encoded_whole(tiny: Tiny) -> None:
    engine = tiny.engine(max_audio_frames=12)
    first_turn = Message("user", (AudioPart(_tone(1.0, 300)),))
    later = (Message("assistant", (TextPart("Sure, go on."),)), Message("user", (AudioPart(_tone(0.6, 180)),)))
    _run(engine.make_generation(engine.prepare(replace(_request(first_turn), conversation_id="call-1"))))
    stored_first = len(engine.prefixes._entries["call-1"].ids)
    second = _request(first_turn, *later)
    reused = engine.make_generation(engine.prepare(replace(second, conversation_id="call-1")))
    reused_steps = _run(reused)
    whole = engine.make_generation(engine.prepare(replace(second, conversation_id="call-2")))
    whole_steps = _run(whole)

    stored_reused, stored_whole = engine.prefixes._entries["call-1"], engine.prefixes._entries["call-2"]
    same = {"atol": 1e-4, "rtol": 1e-4}  # the same numbers up to float32 rounding of differently shaped matmuls
    torch.testing.assert_close(stored_reused.cache.layers[0].keys, stored_whole.cache.layers[0].keys, **same)
    torch.testing.assert_close(stored_reused.talker_states, stored_whole.talker_states, **same)
    assert reused.text_ids == whole.text_ids
    assert torch.equal(_codes(reused), _codes(whole))
    assert np.array_equal(_audio(reused_steps), _audio(whole_steps))
    assert reused_steps[-1][-1].cached_input_tokens == stored_first  # type: ignore[union-attr]
    assert whole_steps[-1][-1].cached_input_tokens == 0  # type: ignore[union-attr]


def test_a_turn_with_only_instructions_is_answered_in_speech(tiny: Tiny) -> None:
    """A Realtime `response.create` before the caller said anything (a greeting): no user turn at all."""
    request = ResponseRequest(messages=(), instructions="Greet the caller.", sampling=SamplingParams(max_tokens=6))
    generation = _generation(tiny, request, max_audio_frames=4)
    audio = _audio(_run(generation))

    assert len(generation.text_ids) == 6
    assert audio.shape[0] == SAMPLES_PER_FRAME * 4 - WINDOW_TAIL


def test_an_image_with_audio_equals_generate(tiny: Tiny) -> None:
    request = _request(Message("user", (ImagePart(png_image(64, 96)), AudioPart(_tone(1.0, 220)))))
    plan = tiny.engine().prepare(request)
    expected = _generate(tiny, request, text_tokens=MAX_TEXT_TOKENS, frames=10)
    generation = _generation(tiny, request, max_audio_frames=10)
    _run(generation)

    assert plan.inputs.image_grid_thw is not None and plan.inputs.image_grid_thw.tolist() == [[1, 4, 6]]
    assert generation.text_ids == expected.text_ids
    assert torch.equal(_codes(generation), expected.codes)


def test_each_audio_clip_gets_the_features_and_token_count_of_the_processor(tiny: Tiny) -> None:
    """Qwen3's processor extracts a clip as it is (no padding: floor(N/160) frames, not one more) and counts its
    audio tokens from that; every clip of a conversation is encoded as the processor encodes it alone."""
    rng = np.random.default_rng(2)
    clips = [_tone(1.5, 220)[:24_077], (0.2 * rng.standard_normal(16_000)).astype(np.float32), _tone(0.3, 500)[:4_830]]
    request = _request(*(Message("user", (AudioPart(clip),)) for clip in clips))
    inputs = tiny.engine().prepare(request).inputs
    prompt = tiny.tokenizer.decode(inputs.input_ids[0])
    counts = [segment.count("<|audio_pad|>") for segment in prompt.split("<|audio_start|>")[1:]]

    assert inputs.input_features is not None and inputs.feature_attention_mask is not None
    for row, clip in enumerate(clips):
        official = processor_audio(Qwen3OmniMoeProcessor, [clip])
        frames = int(official["feature_attention_mask"].sum())
        assert frames == len(clip) // 160 == int(inputs.feature_attention_mask[row].sum())
        assert counts[row] == int(official["num_audio_tokens"][0])
        torch.testing.assert_close(
            inputs.input_features[row, :, :frames], official["input_features"][0], rtol=0, atol=0
        )


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_repetition_penalty_matches_generate(tiny: Tiny) -> None:
    """A codec head with two near-tied favourites makes the penalty decide every step."""
    head = tiny.model.talker.codec_head.weight
    saved = head.detach().clone()
    direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            head.zero_()
            for token, scale in ((3, 1.0), (4, 0.99), (5, -1.0), (6, -0.99)):
                head[token] = scale * direction
        short = _request(max_tokens=8)
        expected = _generate(tiny, short, text_tokens=8, frames=12, penalty=1.5)
        penalised = _generation(tiny, short, max_audio_frames=12, talker_repetition_penalty=1.5)
        plain = _generation(tiny, short, max_audio_frames=12)
        _run(penalised)
        _run(plain)
    finally:
        with torch.no_grad():
            head.copy_(saved)

    assert torch.equal(_codes(penalised), expected.codes)
    assert not torch.equal(_codes(penalised)[0], _codes(plain)[0])


def test_streamed_audio_has_every_sample_once_and_matches_a_whole_decode(
    reference: Reference, streamed: tuple[Qwen3Generation, list[list[Delta]]]
) -> None:
    audio = _audio(streamed[1])

    assert audio.shape[0] == SAMPLES_PER_FRAME * MAX_FRAMES - WINDOW_TAIL == reference.wav.shape[0]
    assert np.abs(audio - reference.wav).max() <= 1e-5 * np.abs(reference.wav).max()


def test_first_audio_comes_at_the_first_step_long_before_the_thinker_ends(
    streamed: tuple[Qwen3Generation, list[list[Delta]]],
) -> None:
    steps = streamed[1]

    first_audio = next(i for i, deltas in enumerate(steps) if any(isinstance(d, AudioDelta) for d in deltas))
    last_text = max(i for i, deltas in enumerate(steps) if any(isinstance(d, TextDelta) for d in deltas))
    assert first_audio == 0 < last_text
    first = next(d for d in steps[0] if isinstance(d, AudioDelta))
    assert first.pcm.shape[0] == SAMPLES_PER_FRAME - WINDOW_TAIL  # a 1-frame first window


def test_text_only_requests_run_no_talker_and_keep_the_text(tiny: Tiny, reference: Reference) -> None:
    generation = _generation(tiny, _request(output_audio=False))
    steps = _run(generation)

    assert generation.text_ids == reference.text_ids
    assert generation.frames == []
    assert not any(isinstance(d, AudioDelta) for deltas in steps for d in deltas)
    assert len(steps) == MAX_TEXT_TOKENS  # one thinker token per step, nothing else


def test_the_talker_stops_at_the_frame_limit_and_flushes_the_rest(tiny: Tiny) -> None:
    generation = _generation(tiny, max_audio_frames=5, first_chunk_frames=4)
    audio = _audio(_run(generation))

    assert len(generation.frames) == 5
    assert audio.shape[0] == SAMPLES_PER_FRAME * 5 - WINDOW_TAIL


def test_interleaved_generations_do_not_disturb_each_other(tiny: Tiny, reference: Reference) -> None:
    other = _request(Message("user", (AudioPart(_tone(2.5, 330)),)))
    alone = _generation(tiny, other)
    _run(alone)
    first, second = _generation(tiny), _generation(tiny, other)
    while not (first.finished and second.finished):
        for generation in (first, second):
            if not generation.finished:
                generation.step()

    assert first.text_ids == reference.text_ids
    assert torch.equal(_codes(first), reference.codes)
    assert second.text_ids == alone.text_ids
    assert torch.equal(_codes(second), _codes(alone))


@pytest.mark.parametrize("static_cache", [False, True], ids=["growing caches", "shared slots"])
def test_batched_steps_give_each_session_its_own_answer(tiny: Tiny, reference: Reference, static_cache: bool) -> None:
    """Three sessions of one engine (one text-only, one starting two steps late) share every batched call; each
    gets exactly what it gets alone."""
    other = _request(Message("user", (AudioPart(_tone(2.5, 330)),)))
    alone = _generation(tiny, other)
    _run(alone)
    engine = tiny.engine(static_cache=static_cache, static_cache_tokens=256, max_active=3)
    predictor_batches: list[int] = []
    hook = engine.code_predictor.register_forward_pre_hook(lambda _, args: predictor_batches.append(len(args[0])))
    sessions = [engine.make_generation(engine.prepare(request)) for request in (_request(), other)]
    try:
        step_generations(sessions[:1])
        step_generations(sessions[:1])
        sessions.append(engine.make_generation(engine.prepare(_request(output_audio=False))))
        while live := [generation for generation in sessions if not generation.finished]:
            assert not any(isinstance(result, BaseException) for result in step_generations(live))
    finally:
        hook.remove()

    assert {session.decoding for session in sessions} == {"static" if static_cache else "eager"}
    assert max(predictor_batches) == 2
    assert sessions[0].text_ids == reference.text_ids == sessions[2].text_ids
    assert torch.equal(_codes(sessions[0]), reference.codes)
    assert sessions[1].text_ids == alone.text_ids
    assert torch.equal(_codes(sessions[1]), _codes(alone))
    if static_cache:
        assert engine.slots is not None and engine.slots.thinker.free_slots == engine.slots.talker.free_slots == 3


def test_due_code2wav_windows_of_sessions_are_decoded_together(
    tiny: Tiny, streamed: tuple[Qwen3Generation, list[list[Delta]]]
) -> None:
    """Two callers whose windows fall due in the same step share one code2wav call; each hears its own audio."""
    other = _request(Message("user", (AudioPart(_tone(2.5, 330)),)))
    alone = _run(_generation(tiny, other))
    engine = tiny.engine()
    batch_sizes: list[int] = []
    hook = tiny.model.code2wav.pre_transformer.register_forward_pre_hook(
        lambda _, args, kwargs: batch_sizes.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    sessions = [engine.make_generation(engine.prepare(request)) for request in (_request(), other)]
    steps: list[list[list[Delta]]] = [[], []]
    try:
        while live := [index for index in range(2) if not sessions[index].finished]:
            for index, result in zip(live, step_generations([sessions[index] for index in live]), strict=True):
                assert not isinstance(result, BaseException)
                steps[index].append(result)
    finally:
        hook.remove()

    def error(audio: np.ndarray, expected: np.ndarray) -> float:
        """Largest difference relative to the signal (the tiny decoder's output is about 1e-7 in size)."""
        length = min(len(audio), len(expected))
        return float(np.abs(audio[:length] - expected[:length]).max() / np.abs(expected).max())

    assert 2 in batch_sizes
    assert len(_audio(steps[0])) == len(_audio(streamed[1])) and len(_audio(steps[1])) == len(_audio(alone))
    assert error(_audio(steps[0]), _audio(streamed[1])) < 1e-4
    assert error(_audio(steps[1]), _audio(alone)) < 1e-4


def test_a_failed_batched_call_fails_only_its_sessions_and_frees_their_slots(
    tiny: Tiny, reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An out-of-memory in the batched code predictor ends the two requests it held (the worker turns that into an
    error event for each); their slots are free again and the next request is answered as before."""
    real_predictor = qwen3_omni.predict_residuals
    calls = iter(range(1000))

    def flaky_predictor(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if next(calls) == 3:  # the fourth batched step
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_predictor(*args, **kwargs)

    monkeypatch.setattr(qwen3_omni, "predict_residuals", flaky_predictor)
    engine = tiny.engine(static_cache=True, static_cache_tokens=256, max_active=2)
    sessions = [engine.make_generation(engine.prepare(_request())) for _ in range(2)]
    for _ in range(3):
        step_generations(sessions)
    failed = step_generations(sessions)
    for session in sessions:
        session.close()  # what the GPU worker does with a failed request

    assert all(isinstance(result, RuntimeError) and "simulated" in str(result) for result in failed)
    assert engine.slots is not None and engine.slots.thinker.free_slots == engine.slots.talker.free_slots == 2
    after = engine.make_generation(engine.prepare(_request()))
    _run(after)
    assert after.decoding == "static"
    assert after.text_ids == reference.text_ids
    assert torch.equal(_codes(after), reference.codes)


def test_the_unrolled_code_predictor_for_cuda_graphs_gives_the_same_frames(tiny: Tiny, reference: Reference) -> None:
    """With `cuda_graphs` the predictor re-reads its few positions without a cache, so every pass has a fixed shape
    (on a CPU the same passes run eagerly): greedy frames stay those of `generate()`."""
    engine = tiny.engine(cuda_graphs=True)
    generation = engine.make_generation(engine.prepare(_request()))
    _run(generation)

    assert isinstance(engine.code_predictor, UnrolledCodePredictor)
    assert torch.equal(_codes(generation), reference.codes)


def test_a_seeded_sampled_request_repeats_itself(tiny: Tiny) -> None:
    def sampled(seed: int, cuda_graphs: bool) -> Qwen3Generation:
        request = _request(temperature=1.0, seed=seed)
        generation = _generation(tiny, request, max_audio_frames=6, talker_temperature=0.9, cuda_graphs=cuda_graphs)
        _run(generation)
        return generation

    for cuda_graphs in (False, True):
        one, two, other = sampled(7, cuda_graphs), sampled(7, cuda_graphs), sampled(8, cuda_graphs)
        assert one.text_ids == two.text_ids
        assert torch.equal(_codes(one), _codes(two))
        assert one.text_ids != other.text_ids
        assert not torch.equal(_codes(one)[1:], _codes(other)[1:])  # the residual codes are sampled too


def test_voices_map_to_the_model_speakers(tiny: Tiny) -> None:
    engine = tiny.engine(voice="Aiden")
    speaker_ids = tiny.model.config.talker_config.speaker_id

    assert engine.prepare(_request(voice="Chelsie")).speaker_id == speaker_ids["chelsie"]
    assert engine.prepare(_request(voice="echo")).speaker_id == speaker_ids["ethan"]
    assert engine.prepare(_request(voice="no-such-voice")).speaker_id == speaker_ids["aiden"]


def test_options_are_checked_when_the_engine_is_built() -> None:
    with pytest.raises(EngineError, match="unknown engine option"):
        Qwen3OmniEngine("unused", device="cpu", chunk_size=4)
    with pytest.raises(EngineError, match="first_chunk_frames"):
        Qwen3OmniEngine("unused", device="cpu", first_chunk_frames=8, chunk_frames=4)
    with pytest.raises(EngineError, match="left_context_frames"):
        Qwen3OmniEngine("unused", device="cpu", left_context_frames=0)
    with pytest.raises(EngineError, match="voice"):
        Qwen3OmniEngine("unused", device="cpu", voice="Alloy")


# ---------------------------------------------------------------------------------------------- through the worker
async def test_respond_streams_text_and_audio_through_the_gpu_worker(
    tiny: Tiny, streamed: tuple[Qwen3Generation, list[list[Delta]]]
) -> None:
    engine = Qwen3OmniEngine(str(tiny.path), device="cpu", max_audio_frames=MAX_FRAMES, **GREEDY)
    await engine.start()
    try:
        deltas = [delta async for delta in engine.respond(_request())]
    finally:
        await engine.close()

    direct = streamed[1]
    assert _text([deltas]) == _text(direct)
    assert np.array_equal(_audio([deltas]), _audio(direct))
    assert isinstance(deltas[-1], Usage)
    assert not engine.ready


async def test_cancelling_the_stream_stops_the_generation_and_frees_it(tiny: Tiny) -> None:
    engine = Qwen3OmniEngine(str(tiny.path), device="cpu", max_audio_frames=MAX_FRAMES, **GREEDY)
    generations: list[Qwen3Generation] = []

    def make_generation(prepared: Any) -> Qwen3Generation:
        generations.append(Qwen3OmniEngine.make_generation(engine, prepared))
        return generations[-1]

    engine.make_generation = make_generation  # type: ignore[method-assign]  # keep a handle on the generation
    await engine.start()
    try:
        stream = engine.respond(_request())
        async for delta in stream:
            if isinstance(delta, AudioDelta):
                break
        await stream.aclose()
        for _ in range(200):
            if engine.load_info == (0, 0):
                break
            await asyncio.sleep(0.01)
        load_after_cancel = engine.load_info
    finally:
        await engine.close()

    assert load_after_cancel == (0, 0)
    (generation,) = generations
    assert generation.finished
    assert generation._decoder is None  # its caches went with it
    assert len(generation.frames) < MAX_FRAMES  # stopped, not run to the end


async def test_an_engine_without_audio_answers_in_text(tiny: Tiny) -> None:
    engine = Qwen3OmniEngine(str(tiny.path), device="cpu", enable_audio=False)
    await engine.start()
    try:
        deltas = [delta async for delta in engine.respond(_request())]
    finally:
        await engine.close()

    assert not any(isinstance(d, AudioDelta) for d in deltas)
    assert any(isinstance(d, TextDelta) for d in deltas)


def test_codec_sampling_keeps_to_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.05, 0.6, 0.3, 0.05], [0.4, 0.3, 0.2, 0.1]]))
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]

    def drawn(**kwargs: Any) -> set[tuple[int, int]]:
        return {tuple(pick_tokens(logits, generators=generators, **kwargs).tolist()) for _ in range(200)}

    assert drawn(temperature=0.0) == {(1, 0)}
    assert {first for first, _ in drawn(temperature=1.0, top_k=2)} == {1, 2}
    assert {second for _, second in drawn(temperature=1.0, top_p=0.65)} == {0, 1}  # 0.4 + 0.3 covers 0.65
    assert len({second for _, second in drawn(temperature=1.0)}) == 4


# ---------------------------------------------------------------------------------------------- the vocoder stream
@pytest.mark.parametrize(("first", "chunk"), [(1, 4), (4, 4), (2, 3), (1, 1)])
def test_code2wav_stream_emits_each_sample_once(tiny: Tiny, first: int, chunk: int) -> None:
    frames = torch.randint(0, 2048, (17, 16), generator=torch.Generator().manual_seed(1))
    pieces, whole = streamed_and_whole(tiny.model.code2wav, frames, chunk_frames=chunk, first_chunk_frames=first)
    audio = np.concatenate(pieces)

    assert pieces[0].shape[0] == first * SAMPLES_PER_FRAME - WINDOW_TAIL
    assert audio.shape[0] == whole.shape[0] == 17 * SAMPLES_PER_FRAME - WINDOW_TAIL
    # the default left context is the receptive field of the tiny decoder: streaming is exact
    assert np.abs(audio - whole).max() <= 1e-5 * np.abs(whole).max()


def streamed_and_whole(
    code2wav: torch.nn.Module,
    frames: torch.Tensor,
    *,
    chunk_frames: int = 4,
    first_chunk_frames: int = 1,
    **context: Any,
) -> tuple[list[np.ndarray], np.ndarray]:
    """`[frames, quantizers]` codes streamed (each window decoded before the next is handed out, as in a
    generation), and decoded whole in one call."""
    stream = CausalCode2WavStream(code2wav, chunk_frames=chunk_frames, first_chunk_frames=first_chunk_frames, **context)
    with torch.inference_mode():
        pieces = [stream.audio(decode_window(code2wav, *w)) for frame in frames if (w := stream.add(frame)) is not None]
        if (tail := stream.rest()) is not None:
            pieces.append(stream.audio(decode_window(code2wav, *tail)))
        whole = code2wav(frames.T.unsqueeze(0)).reshape(-1).numpy()
    return pieces, whole


@pytest.mark.slow
def test_a_code2wav_streamed_with_its_default_context_equals_the_whole_decode(tiny: Tiny) -> None:
    """A code2wav with the real sliding window (72 frames) and two transformer layers reaches 142 + 10 frames back;
    streaming with the default context (its receptive field) gives the whole decode's samples, where the official
    25 frames fell short of even one layer's window."""
    config = replace_config(tiny.model.config.code2wav_config, num_hidden_layers=2, layer_scale_initial_scale=1.0)
    torch.manual_seed(4)
    code2wav = Qwen3OmniMoeCode2Wav._from_config(config).eval()
    frames = torch.randint(0, 2048, (200, 16), generator=torch.Generator().manual_seed(5))
    assert code2wav_receptive_field(config) == (142, 10)

    pieces, whole = streamed_and_whole(code2wav, frames)
    default = np.concatenate(pieces)
    official = np.concatenate(streamed_and_whole(code2wav, frames, left_context_frames=25)[0])

    scale = np.abs(whole).max()
    assert default.shape == official.shape == whole.shape == (200 * SAMPLES_PER_FRAME - WINDOW_TAIL,)
    assert np.abs(default - whole).max() <= 1e-5 * scale
    assert np.abs(official - whole).max() > 1e-3 * scale  # what the default context fixes


def test_code2wav_windows_ramp_up_to_the_chunk_size(tiny: Tiny) -> None:
    stream = CausalCode2WavStream(tiny.model.code2wav, chunk_frames=4, first_chunk_frames=1, left_context_frames=25)
    fired = []
    with torch.inference_mode():
        for index in range(16):
            if (window := stream.add(torch.zeros(16, dtype=torch.long))) is not None:
                stream.audio(decode_window(tiny.model.code2wav, *window))
                fired.append(index + 1)

    assert fired == [1, 2, 4, 8, 12, 16]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_the_latency_benchmark_runs_on_the_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    benchmark = importlib.import_module("benchmarks.engine_latency")
    arguments = ["--model", "qwen3-omni", "--tiny", "--device", "cpu", "--text-tokens", "6", "--codes", "8"]
    benchmark.main(
        [*arguments, "--seconds", "1", "--reps", "1", "--warmup", "0", "--sessions", "1,2", "--history", "0"]
    )
    printed = capsys.readouterr().out

    for figure in ("first audio (request -> first PCM)", "code predictor (15 passes a frame)", "RTF", "generate()"):
        assert figure in printed
    assert "sessions sustained at real time" in printed
