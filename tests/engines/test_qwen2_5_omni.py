"""The Qwen2.5-Omni engine on a tiny random checkpoint: streaming must equal `generate()` and stream early."""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_common import processor_audio
from tiny_models import OnlyCodes
from transformers import LogitsProcessorList, WhisperFeatureExtractor
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

from omnivox.pipeline.engines.base import (
    AudioDelta,
    AudioPart,
    Delta,
    Engine,
    EngineBusy,
    EngineError,
    EngineNotReady,
    EngineOutOfMemory,
    ImagePart,
    Message,
    ResponseRequest,
    SamplingParams,
    TextDelta,
    TextPart,
    Usage,
)
from omnivox.pipeline.engines.qwen2_5_omni import (
    SYSTEM_PROMPT,
    Qwen25Generation,
    Qwen25OmniEngine,
    TurnPlan,
    step_generations,
)
from omnivox.pipeline.engines.qwen2_5_token2wav import DitSolver, Token2WavStream, plan_chunks
from omnivox.pipeline.engines.qwen_common import (
    TRANSCRIPTION_INSTRUCTION,
    TRANSCRIPTION_MIN_TOKENS,
    IncrementalText,
    resolve_speaker,
    transcription_request,
)
from tests.image_fixtures import png_image

SAMPLES_PER_CODE = 480
GREEDY = {"talker_temperature": 0.0, "talker_repetition_penalty": 1.0}
AS_GENERATE = {**GREEDY, "talker_attention_mask": False}
"""transformers 5.23's generate() runs the talker without its attention mask (see the option's docstring)."""


def tone(seconds: float, frequency: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def audio_turn(seconds: float = 1.5, *, seed: int = 0, output_audio: bool = True, **sampling: Any) -> ResponseRequest:
    return ResponseRequest(
        messages=(Message("user", (AudioPart(tone(seconds)),)),),
        output_audio=output_audio,
        sampling=SamplingParams(**{"temperature": 0.0, "seed": seed, **sampling}),
    )


def started(directory: Path, **options: Any) -> Qwen25OmniEngine:
    engine = Qwen25OmniEngine(str(directory), device="cpu", **options)
    asyncio.run(engine.start())
    return engine


def run_to_end(engine: Qwen25OmniEngine, request: ResponseRequest) -> tuple[Qwen25Generation, list[Delta]]:
    """Drive one generation on the calling thread, as the GPU worker would."""
    generation = engine.make_generation(engine.prepare(request))
    deltas: list[Delta] = []
    while not generation.finished:
        deltas += generation.step()
    return generation, deltas


def pcm_of(deltas: list[Delta]) -> np.ndarray:
    return np.concatenate([d.pcm for d in deltas if isinstance(d, AudioDelta)])


@pytest.fixture(scope="module")
def engine(tiny_qwen2_5_dir: Path) -> Qwen25OmniEngine:
    return started(tiny_qwen2_5_dir, max_text_tokens=20, max_audio_codes=120, **AS_GENERATE)


@pytest.fixture(scope="module")
def static_engine(tiny_qwen2_5_dir: Path) -> Qwen25OmniEngine:
    """Decodes on preallocated slots (the CUDA-graph layout); 256 tokens fit the 1.5 s turn but not a long one."""
    return started(
        tiny_qwen2_5_dir,
        max_text_tokens=20,
        max_audio_codes=120,
        static_cache=True,
        static_cache_tokens=256,
        max_active=2,
        **AS_GENERATE,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("decoding", "seconds"), [("growing caches", 1.5), ("static slots", 1.5), ("static, prompt too long", 4.0)]
)
def test_streamed_text_and_codes_equal_generate(
    engine: Qwen25OmniEngine, static_engine: Qwen25OmniEngine, decoding: str, seconds: float
) -> None:
    engine = static_engine if decoding.startswith("static") else engine
    request = audio_turn(seconds)
    plan = engine.prepare(request)
    generation, deltas = run_to_end(engine, request)

    vocoder_inputs: list[torch.Tensor] = []
    hook = engine.model.token2wav.register_forward_pre_hook(lambda _module, args: vocoder_inputs.append(args[0]))
    try:
        sequences, _ = engine.model.generate(
            **plan.inputs.tensors(torch.device("cpu"), torch.float32),
            speaker="Chelsie",
            thinker_max_new_tokens=20,
            thinker_do_sample=False,
            thinker_eos_token_id=sorted(engine.text_eos_ids),
            talker_max_new_tokens=120,
            talker_do_sample=False,
            talker_repetition_penalty=1.0,
            talker_logits_processor=LogitsProcessorList([OnlyCodes()]),
        )
    finally:
        hook.remove()

    expected_text = sequences[0, plan.inputs.prompt_tokens :].tolist()
    assert generation.decoding == ("static" if decoding == "static slots" else "eager")
    assert generation.text_ids == expected_text
    assert generation.codes == vocoder_inputs[0][0].tolist()
    streamed_text = "".join(d.text for d in deltas if isinstance(d, TextDelta))
    assert streamed_text == engine.tokenizer.decode(expected_text, skip_special_tokens=True)
    assert len(pcm_of(deltas)) == SAMPLES_PER_CODE * len(generation.codes)
    assert deltas[-1] == Usage(input_tokens=plan.inputs.prompt_tokens, output_tokens=len(expected_text))


@pytest.mark.slow
def test_sessions_decoded_as_one_batch_say_what_each_says_alone(
    engine: Qwen25OmniEngine, static_engine: Qwen25OmniEngine
) -> None:
    """Two callers with different turns, the second starting three steps later, share every slot step; each hears
    exactly the text, codes and audio it gets alone on growing caches."""
    requests = [
        ResponseRequest(messages=(Message("user", (AudioPart(tone(1.5)),)),), sampling=SamplingParams(temperature=0.0)),
        ResponseRequest(
            messages=(Message("user", (AudioPart(tone(1.0, frequency=440.0)),)),),
            sampling=SamplingParams(temperature=0.0),
        ),
    ]
    alone = [run_to_end(engine, request) for request in requests]
    batch_sizes: list[int] = []
    pool = static_engine.slots
    assert pool is not None
    step_of_all_slots = pool.thinker.step

    def counting_step(slots: list[int], embeds: torch.Tensor) -> torch.Tensor:
        batch_sizes.append(len(slots))
        return step_of_all_slots(slots, embeds)

    pool.thinker.step = counting_step  # type: ignore[method-assign]
    try:
        together = [static_engine.make_generation(static_engine.prepare(request)) for request in requests]
        deltas: list[list[Delta]] = [[], []]
        for _ in range(3):
            deltas[0] += together[0].step()
        while live := [index for index in range(2) if not together[index].finished]:
            for index, result in zip(live, step_generations([together[index] for index in live]), strict=True):
                assert not isinstance(result, BaseException)
                deltas[index] += result
    finally:
        del pool.thinker.step
    assert max(batch_sizes) == 2
    for (solo, solo_deltas), batched, batched_deltas in zip(alone, together, deltas, strict=True):
        assert batched.decoding == "static"
        assert batched.text_ids == solo.text_ids
        assert batched.codes == solo.codes
        np.testing.assert_allclose(pcm_of(batched_deltas), pcm_of(solo_deltas), atol=1e-4)
    assert pool.thinker.free_slots == pool.talker.free_slots == 2


@pytest.mark.slow
def test_a_continued_conversation_encodes_only_its_new_turn_and_answers_as_if_encoded_whole(
    engine: Qwen25OmniEngine,
) -> None:
    first_turn = Message("user", (AudioPart(tone(1.0)),))
    later_turns = (Message("assistant", (TextPart("Sure, go on."),)), Message("user", (AudioPart(tone(0.8, 330.0)),)))
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    prefill_lengths: list[int] = []
    hook = engine.model.thinker.register_forward_pre_hook(
        lambda _, args, kwargs: prefill_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        run_to_end(engine, ResponseRequest((first_turn,), sampling=greedy, conversation_id="call-1"))
        first_prompt = engine.prefixes._entries["call-1"].ids
        prefill_lengths.clear()
        second = ResponseRequest((first_turn, *later_turns), sampling=greedy, conversation_id="call-1")
        reused, reused_deltas = run_to_end(engine, second)
        reused_prefill = prefill_lengths[0]
    finally:
        hook.remove()
    whole, whole_deltas = run_to_end(engine, replace(second, conversation_id="call-2"))  # nothing stored: whole

    assert reused_prefill == whole._plan.inputs.prompt_tokens - len(first_prompt)  # only the new turns
    assert reused_deltas[-1] == Usage(whole._plan.inputs.prompt_tokens, 12, cached_input_tokens=len(first_prompt))
    assert whole_deltas[-1] == Usage(whole._plan.inputs.prompt_tokens, 12, cached_input_tokens=0)
    stored_reused, stored_whole = engine.prefixes._entries["call-1"], engine.prefixes._entries["call-2"]
    assert stored_reused.ids == stored_whole.ids
    torch.testing.assert_close(stored_reused.cache.layers[0].keys, stored_whole.cache.layers[0].keys)
    torch.testing.assert_close(stored_reused.talker_states, stored_whole.talker_states)
    assert reused.text_ids == whole.text_ids
    assert reused.codes == whole.codes
    np.testing.assert_allclose(pcm_of(reused_deltas), pcm_of(whole_deltas), atol=1e-4)

    edited = ResponseRequest((Message("user", (AudioPart(tone(1.0, 500.0)),)), *later_turns), sampling=greedy)
    misses = engine.prefixes.misses
    run_to_end(engine, replace(edited, conversation_id="call-1"))  # the first turn's audio changed: encoded whole
    assert engine.prefixes.misses == misses + 1
    engine.forget_conversation("call-1")
    assert "call-1" not in engine.prefixes._entries


@pytest.mark.slow
def test_a_chunk_ramp_from_the_config_streams_its_planned_chunks(tiny_qwen2_5_dir: Path) -> None:
    engine = started(
        tiny_qwen2_5_dir, max_text_tokens=20, max_audio_codes=120, first_chunk_codes=24, chunk_ramp_mel=[24, 24, 48]
    )
    generation, deltas = run_to_end(engine, audio_turn())
    chunks = [len(d.pcm) for d in deltas if isinstance(d, AudioDelta)]
    planned = plan_chunks(len(generation.codes), first_chunk_codes=24, chunk_ramp_mel=(24, 24, 48))
    assert chunks == [chunk.mel * 240 for chunk in planned if chunk.mel]
    assert sum(chunks) == SAMPLES_PER_CODE * len(generation.codes)
    assert chunks[:4] == [28 * 240, 24 * 240, 24 * 240, 48 * 240]  # 0.28 s first, then the ramp


@pytest.mark.slow
def test_first_audio_arrives_while_text_is_still_streaming(tiny_qwen2_5_dir: Path) -> None:
    engine = started(tiny_qwen2_5_dir, max_text_tokens=90, max_audio_codes=100, **GREEDY)
    _, deltas = run_to_end(engine, audio_turn())
    kinds = [type(d) for d in deltas]
    first_audio = kinds.index(AudioDelta)
    last_text = len(kinds) - 1 - kinds[::-1].index(TextDelta)
    assert first_audio < last_text
    assert sum(isinstance(d, TextDelta) for d in deltas[first_audio:]) >= 10


@pytest.mark.slow
def test_an_early_text_end_is_handled_as_generate_does(tiny_qwen2_5_dir: Path) -> None:
    """The end-of-text token is never fed to the thinker; the talker reads tts_eos in its slot, then tts_pad."""
    engine = started(tiny_qwen2_5_dir, max_text_tokens=20, max_audio_codes=60, **AS_GENERATE)
    free_run, _ = run_to_end(engine, audio_turn())
    end_at = next(i for i, token in enumerate(free_run.text_ids) if i >= 2 and token not in free_run.text_ids[:i])
    end_token = free_run.text_ids[end_at]
    engine.text_eos_ids = frozenset({end_token})
    generation, deltas = run_to_end(engine, audio_turn())
    assert generation.text_ids == free_run.text_ids[: end_at + 1]

    plan = engine.prepare(audio_turn())
    vocoder_inputs: list[torch.Tensor] = []
    hook = engine.model.token2wav.register_forward_pre_hook(lambda _module, args: vocoder_inputs.append(args[0]))
    try:
        engine.model.generate(
            **plan.inputs.tensors(torch.device("cpu"), torch.float32),
            speaker="Chelsie",
            thinker_max_new_tokens=20,
            thinker_do_sample=False,
            thinker_eos_token_id=[end_token],
            talker_max_new_tokens=60,
            talker_do_sample=False,
            talker_repetition_penalty=1.0,
            talker_logits_processor=LogitsProcessorList([OnlyCodes()]),
        )
    finally:
        hook.remove()
    assert generation.codes == vocoder_inputs[0][0].tolist()
    assert deltas[-1] == Usage(input_tokens=plan.inputs.prompt_tokens, output_tokens=end_at)


@pytest.mark.slow
def test_the_voice_selects_the_speaker(engine: Qwen25OmniEngine) -> None:
    def spoken(voice: str) -> np.ndarray:
        request = ResponseRequest(
            messages=(Message("user", (AudioPart(tone(1.0)),)),),
            voice=voice,
            sampling=SamplingParams(temperature=0.0, max_tokens=4, seed=0),
        )
        assert engine.prepare(request).speaker == {"alloy": "Chelsie", "echo": "Ethan", "Ethan": "Ethan"}[voice]
        return pcm_of(run_to_end(engine, request)[1])

    assert np.array_equal(spoken("echo"), spoken("Ethan"))
    assert not np.array_equal(spoken("alloy"), spoken("echo"))


@pytest.mark.parametrize("first_chunk_codes", [48, 24])
def test_vocoder_stream_is_480_samples_per_code_and_joins_smoothly(
    engine: Qwen25OmniEngine, first_chunk_codes: int
) -> None:
    """Chunked decoding approximates the whole-utterance DiT (same noise); each chunk must join without a step."""
    codes = [int(c) for c in torch.randint(0, 8192, (157,), generator=torch.Generator().manual_seed(1))]
    stream = Token2WavStream(
        engine.model.token2wav,
        engine.dit_solver,
        voice=engine.voices["Chelsie"],
        max_codes=len(codes),
        generator=torch.Generator().manual_seed(3),
        first_chunk_codes=first_chunk_codes,
    )
    chunks = []
    with torch.inference_mode():
        for index, code in enumerate(codes):
            ready = stream.push(code)
            if ready and not chunks:
                assert index + 1 == first_chunk_codes
            chunks += ready
        chunks += stream.flush()
        whole = stream.vocode(stream.denoise(stream.noise, torch.tensor([codes]))).numpy()
    streamed = np.concatenate(chunks)
    assert len(chunks) >= 3
    assert len(streamed) == len(whole) == SAMPLES_PER_CODE * len(codes)
    relative_error = np.abs(streamed - whole).max() / np.abs(whole).max()
    assert relative_error < 1e-3


def test_token2wav_keeps_the_checkpoints_float32_weights_under_a_bf16_model(tiny_qwen2_5_dir: Path) -> None:
    """from_pretrained builds token2wav in float32 (enable_talker) and loads it so, whatever `dtype` the rest gets:
    nothing is rounded to bf16 on the way (the checkpoint's own tensors, bit for bit)."""
    from safetensors.torch import load_file

    engine = Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", dtype="bfloat16")
    model, _ = engine.load_weights()
    stored = {key: value for key, value in load_file(tiny_qwen2_5_dir / "model.safetensors").items()}
    assert model.thinker.lm_head.weight.dtype == torch.bfloat16
    loaded = {f"token2wav.{name}": value for name, value in model.token2wav.state_dict().items()}
    assert {value.dtype for value in loaded.values() if value.is_floating_point()} == {torch.float32}
    assert all(torch.equal(loaded[key], stored[key]) for key in stored if key in loaded)
    assert sum(key in loaded for key in stored) > 200


def test_the_dit_velocity_is_the_models_forward_with_the_voice_computed_once(engine: Qwen25OmniEngine) -> None:
    dit = engine.model.token2wav.code2wav_dit_model
    speaker = engine.model.speaker_map["Ethan"]
    generator = torch.Generator().manual_seed(5)
    state = torch.randn(1, 100, dit.mel_dim, generator=generator)
    codes = torch.randint(0, 8193, (1, 50), generator=generator)
    with torch.inference_mode():
        output = dit(
            hidden_states=state,
            quantized_code=codes,
            speaker_embedding=speaker["cond"].float()[:, None].expand(-1, 100, -1),
            condition_vector=speaker["ref_mel"].float(),
            time_step=torch.tensor(0.37),
            apply_cfg=True,
        )
        guided, unguided = output.chunk(2)
        velocity = engine.dit_solver.velocity(state, codes, engine.voices["Ethan"], 0.37)
    torch.testing.assert_close(velocity, guided + (guided - unguided) * 0.5, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_each_voice_is_encoded_once_not_at_every_dit_call(tiny_qwen2_5_dir: Path) -> None:
    """The speaker encoder's output depends only on the voice: it runs once per speaker at load, never per chunk."""
    engine = Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", max_text_tokens=20, max_audio_codes=120, **GREEDY)
    model, tokenizer = engine.load_weights()
    encoded: list[int] = []
    hook = model.token2wav.code2wav_dit_model.input_embed.spk_encoder.register_forward_hook(
        lambda _module, args, _output: encoded.append(args[0].shape[0])
    )
    try:
        engine.install(model, tokenizer)
        assert len(encoded) == len(model.speaker_map) == 2
        encoded.clear()
        for voice in ("Chelsie", "Ethan"):
            generation, deltas = run_to_end(engine, replace(audio_turn(), voice=voice))
            assert len(pcm_of(deltas)) == SAMPLES_PER_CODE * len(generation.codes) >= 100  # two DiT windows or more
    finally:
        hook.remove()
    assert encoded == []


@pytest.mark.slow
def test_a_bf16_dit_gets_its_time_and_speaker_conditioning_in_float32(tiny_qwen2_5_dir: Path) -> None:
    """With dit_dtype bfloat16 the ODE time still reaches the sinusoidal embedding (scale 1000) as float32, and the
    speaker encoder runs in float32: only the transformer blocks are bfloat16."""
    engine = started(tiny_qwen2_5_dir, max_text_tokens=8, max_audio_codes=60, dit_dtype="bfloat16", **GREEDY)
    dit = engine.model.token2wav.code2wav_dit_model
    times: list[torch.Tensor] = []
    hook = dit.time_embed.register_forward_pre_hook(lambda _module, args: times.append(args[0]))
    try:
        with torch.inference_mode():
            mel = engine.dit_solver.solve(
                torch.randn(1, 96, dit.mel_dim, generator=torch.Generator().manual_seed(0)),
                torch.zeros(1, 48, dtype=torch.long),
                engine.voices["Chelsie"],
            )
    finally:
        hook.remove()
    assert dit.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert {parameter.dtype for parameter in dit.time_embed.parameters()} == {torch.float32}
    assert {parameter.dtype for parameter in dit.input_embed.spk_encoder.parameters()} == {torch.float32}
    assert len(times) == 4 * (10 - 1) and all(time.dtype == torch.float32 for time in times)
    assert sorted({round(float(time[0]), 6) for time in times})[:2] == [0.0, round(engine.dit_solver._times[1] / 3, 6)]
    assert engine.voices["Chelsie"].reference.dtype == torch.float32
    assert mel.dtype == torch.float32 and torch.isfinite(mel).all()


@pytest.mark.slow
def test_the_last_window_of_an_utterance_runs_at_a_fixed_length_with_the_same_mel(engine: Qwen25OmniEngine) -> None:
    """With CUDA graphs only the regular window lengths are captured: the last, shorter window of an utterance is
    padded to one of them with frames masked out of attention, so it replays a graph instead of running eagerly
    (its mel is the same). Here the padded path runs eagerly (no GPU)."""
    dit = engine.model.token2wav.code2wav_dit_model
    windows = Token2WavStream.regular_windows(48)
    codes = [int(c) for c in torch.randint(0, 8192, (157,), generator=torch.Generator().manual_seed(1))]
    lengths: list[int] = []
    hook = dit.input_embed.proj.register_forward_pre_hook(lambda _module, args: lengths.append(args[0].shape[1]))
    audio = {}
    try:
        for fixed in ((), windows):
            solver = DitSolver(dit, steps=10, fixed_lengths=fixed)
            stream = Token2WavStream(
                engine.model.token2wav,
                solver,
                voice=engine.voices["Chelsie"],
                max_codes=len(codes),
                generator=torch.Generator().manual_seed(3),
            )
            lengths.clear()
            with torch.inference_mode():
                chunks = [pcm for code in codes for pcm in stream.push(code)] + stream.flush()
            audio[fixed] = np.concatenate(chunks)
            assert (set(lengths) <= set(windows)) == bool(fixed)  # unpadded, the last window has its own length
    finally:
        hook.remove()
    assert windows == (96, 144)
    assert len(audio[()]) == len(audio[windows]) == SAMPLES_PER_CODE * len(codes)
    np.testing.assert_allclose(audio[windows], audio[()], rtol=0, atol=1e-5 * np.abs(audio[()]).max())


@pytest.mark.slow
def test_text_only_request_streams_the_same_text_and_no_audio(engine: Qwen25OmniEngine) -> None:
    spoken, _ = run_to_end(engine, audio_turn())
    text_only, deltas = run_to_end(engine, audio_turn(output_audio=False))
    assert text_only.text_ids == spoken.text_ids
    assert not any(isinstance(d, AudioDelta) for d in deltas)
    assert text_only.codes == []


@pytest.mark.slow
def test_talker_attention_mask_switch_changes_the_talker_only(tiny_qwen2_5_dir: Path, engine: Qwen25OmniEngine) -> None:
    masked = started(tiny_qwen2_5_dir, max_text_tokens=20, max_audio_codes=120, **GREEDY)
    with_mask, deltas = run_to_end(masked, audio_turn())
    without_mask, _ = run_to_end(engine, audio_turn())
    assert with_mask.text_ids == without_mask.text_ids
    assert with_mask.codes != without_mask.codes
    assert len(pcm_of(deltas)) == SAMPLES_PER_CODE * len(with_mask.codes)


def talker_reference_with_mask(
    engine: Qwen25OmniEngine, request: ResponseRequest, *, text_tokens: int, codes: int
) -> tuple[list[int], list[int]]:
    """(text ids, codec codes) of a greedy answer as transformers 4.52's generate() made it, its talker keeping the
    attention mask (5.23's drops it), written out by hand from the model's own modules: the thinker's generate() with
    hidden states; the talker prefill with its mask (TMRoPE positions from the prompt, codec pad/bos embeddings
    added); then one code at a time, the talker computing its positions itself from the mask and its rope offset."""
    model, talker = engine.model, engine.model.talker
    plan = engine.prepare(request)
    inputs = plan.inputs.tensors(torch.device("cpu"), torch.float32)
    input_ids = inputs["input_ids"]
    embed = model.thinker.get_input_embeddings()
    with torch.inference_mode():
        thinker = model.thinker.generate(
            **inputs,
            max_new_tokens=text_tokens,
            do_sample=False,
            eos_token_id=sorted(engine.text_eos_ids),
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
        text_ids = thinker.sequences[0, input_ids.shape[1] :].tolist()
        prompt_embeds = thinker.hidden_states[0][0].clone()
        config = model.config.thinker_config
        prompt_embeds[(input_ids == config.audio_token_index) | (input_ids == config.image_token_index)] = 0
        replies = [states[-1] + states[0] for states in thinker.hidden_states[1:]]  # of every token fed back
        speaker_bos = torch.tensor([[model.speaker_map[plan.speaker]["bos_token"]]])
        ends = embed(torch.tensor([[talker.text_eos_token, talker.text_pad_token]])).split(1, dim=1)
        reply_stream = [*replies[1:], *ends]  # then tts_pad for ever
        prompt_length = input_ids.shape[1] + 2
        output = talker(
            input_ids=torch.tensor(
                [[talker.codec_mask_token] * input_ids.shape[1] + [talker.codec_pad_token, talker.codec_bos_token]]
            ),
            input_text_ids=torch.cat([input_ids, speaker_bos, torch.tensor([text_ids[:1]])], dim=1),
            inputs_embeds=torch.cat([thinker.hidden_states[0][-1] + prompt_embeds, embed(speaker_bos), replies[0]], 1),
            attention_mask=torch.ones(1, prompt_length, dtype=torch.long),
            audio_feature_lengths=inputs["feature_attention_mask"].sum(1),
            image_grid_thw=inputs.get("image_grid_thw"),
            use_cache=True,
        )
        spoken: list[int] = []
        while len(spoken) < codes:
            scores = OnlyCodes()(None, output.logits[:, -1].clone())
            scores[..., talker.codec_bos_token] = -float("inf")
            code = int(scores.argmax(-1))
            if code in engine.codec_stop_ids:
                break
            spoken.append(code)
            output = talker(
                input_ids=torch.tensor([[code]]),
                thinker_reply_part=reply_stream[min(len(spoken) - 1, len(reply_stream) - 1)],
                attention_mask=torch.ones(1, prompt_length + len(spoken), dtype=torch.long),
                past_key_values=output.past_key_values,
                use_cache=True,
            )
    return text_ids, spoken


@pytest.fixture(scope="module")
def masked_engines(tiny_qwen2_5_dir: Path) -> dict[str, Qwen25OmniEngine]:
    """The production talker (its attention mask on), on growing caches and on static slots."""
    limits = {"max_text_tokens": 20, "max_audio_codes": 120, **GREEDY}
    return {
        "eager": started(tiny_qwen2_5_dir, **limits),
        "static slots": started(tiny_qwen2_5_dir, static_cache=True, static_cache_tokens=256, max_active=2, **limits),
    }


@pytest.mark.slow
@pytest.mark.parametrize(("decoding", "image"), [("eager", False), ("static slots", False), ("static slots", True)])
def test_the_production_talker_with_its_mask_equals_a_hand_written_reference(
    masked_engines: dict[str, Qwen25OmniEngine], decoding: str, image: bool
) -> None:
    engine = masked_engines[decoding]
    parts = (ImagePart(png_image(60, 90)), AudioPart(tone(1.0))) if image else (AudioPart(tone(1.5)),)
    request = ResponseRequest(messages=(Message("user", parts),), sampling=SamplingParams(temperature=0.0))
    text_ids, codes = talker_reference_with_mask(engine, request, text_tokens=20, codes=120)
    generation, deltas = run_to_end(engine, request)

    assert generation.decoding == ("static" if decoding == "static slots" else "eager")
    assert generation.text_ids == text_ids
    assert generation.codes == codes
    assert len(codes) > 20
    assert len(pcm_of(deltas)) == SAMPLES_PER_CODE * len(codes)


@pytest.mark.slow
def test_seeded_sampling_repeats_and_the_seed_matters(tiny_qwen2_5_dir: Path) -> None:
    engine = started(tiny_qwen2_5_dir, max_text_tokens=12, max_audio_codes=60)
    sampled = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    first, first_deltas = run_to_end(engine, audio_turn(seed=7, **sampled))
    again, again_deltas = run_to_end(engine, audio_turn(seed=7, **sampled))
    other, _ = run_to_end(engine, audio_turn(seed=8, **sampled))
    assert (first.text_ids, first.codes) == (again.text_ids, again.codes)
    assert np.array_equal(pcm_of(first_deltas), pcm_of(again_deltas))
    assert (first.text_ids, first.codes) != (other.text_ids, other.codes)


def test_prompt_has_the_official_system_prompt_instructions_and_the_whole_conversation(
    engine: Qwen25OmniEngine,
) -> None:
    request = ResponseRequest(
        messages=(
            Message("user", (AudioPart(tone(1.0)),)),
            Message("assistant", (TextPart("Hello there"), AudioPart(tone(0.5)))),
            Message("user", (TextPart("and "), AudioPart(tone(2.0)))),
        ),
        instructions="Answer briefly.",
    )
    plan: TurnPlan = engine.prepare(request)
    prompt = engine.tokenizer.decode(plan.inputs.input_ids[0])
    assert prompt.startswith(
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>system\nAnswer briefly.<|im_end|>\n"
    )
    assert "<|im_start|>assistant\nHello there<|im_end|>\n<|im_start|>user\nand <|audio_bos|>" in prompt
    assert prompt.endswith("<|audio_eos|><|im_end|>\n<|im_start|>assistant\n")
    assert plan.inputs.input_features is not None and plan.inputs.feature_attention_mask is not None
    assert plan.inputs.input_features.shape[0] == 2  # the assistant's audio is represented by its transcript
    assert [prompt.count("<|AUDIO|>")] == [25 + 50]  # 25 audio tokens per second of input
    assert plan.inputs.feature_attention_mask.sum(-1).tolist() == [100, 200]


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{{ '<|im_start|>assistant\n' }}"
)
"""The ChatML layout of the Qwen chat templates, for text-only messages."""


@pytest.mark.parametrize(
    ("instructions_turn", "expected_messages"),
    [
        ("system", [("system", SYSTEM_PROMPT), ("system", "Speak like a pirate."), ("user", "Hi!")]),
        ("user", [("system", SYSTEM_PROMPT), ("user", "Speak like a pirate.\n\nHi!")]),
    ],
)
def test_the_official_system_turn_stays_byte_exact_and_the_instructions_land_where_configured(
    tiny_qwen2_5_dir: Path, instructions_turn: str, expected_messages: list[tuple[str, str]]
) -> None:
    """Speech output needs the official system prompt as the first turn, exactly: the caller's instructions never
    change it, whichever turn carries them."""
    engine = started(tiny_qwen2_5_dir, instructions_turn=instructions_turn, enable_audio=False)
    later = (Message("assistant", (TextPart("Arr."),)), Message("user", (TextPart("Again!"),)))
    for messages in [(Message("user", (TextPart("Hi!"),)),), (Message("user", (TextPart("Hi!"),)), *later)]:
        request = ResponseRequest(messages=messages, instructions="  Speak like a pirate.  ")
        ids = engine.prepare(request).inputs.input_ids[0].tolist()
        official = engine.tokenizer(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n", add_special_tokens=False)
        assert ids[: len(official.input_ids)] == official.input_ids
        rendered = engine.tokenizer.apply_chat_template(
            [{"role": role, "content": text} for role, text in expected_messages]
            + [{"role": message.role, "content": message.parts[0].text} for message in messages[1:]],
            chat_template=CHATML,
            tokenize=False,
        )
        assert engine.tokenizer.decode(ids) == rendered


def test_audio_features_equal_the_official_30_s_padding_on_every_valid_frame(engine: Qwen25OmniEngine) -> None:
    """The prompt pads audio one FFT window past the longest clip, not to 30 s (23 ms saved per turn)."""
    rng = np.random.default_rng(1)
    clips = [tone(1.5), (0.2 * rng.standard_normal(64_170)).astype(np.float32), tone(0.31, frequency=500.0)]
    request = ResponseRequest(messages=tuple(Message("user", (AudioPart(clip),)) for clip in clips))
    inputs = engine.prepare(request).inputs
    official = WhisperFeatureExtractor(feature_size=128)(
        clips, sampling_rate=16_000, padding="max_length", return_attention_mask=True, return_tensors="pt"
    )
    assert inputs.input_features is not None and inputs.feature_attention_mask is not None
    assert inputs.input_features.shape[-1] < 3000 == official["input_features"].shape[-1]
    for row, clip in enumerate(clips):
        frames = int(official["attention_mask"][row].sum())
        assert frames == -(-len(clip) // 160) == int(inputs.feature_attention_mask[row].sum())
        torch.testing.assert_close(
            inputs.input_features[row, :, :frames], official["input_features"][row, :, :frames], rtol=0, atol=0
        )


def test_a_turn_over_30_s_becomes_clips_the_processor_would_make_and_nothing_is_dropped(
    engine: Qwen25OmniEngine,
) -> None:
    """The processor keeps the first 30 s of a clip (and drops the rest); the prompt keeps that first clip exactly and
    the rest as a clip of its own, encoded as the processor encodes it."""
    speech = (0.2 * np.random.default_rng(3).standard_normal(45 * 16_000 + 123)).astype(np.float32)
    inputs = engine.prepare(ResponseRequest(messages=(Message("user", (AudioPart(speech),)),))).inputs
    prompt = engine.tokenizer.decode(inputs.input_ids[0])
    segments = prompt.split("<|audio_bos|>")[1:]

    assert inputs.input_features is not None and inputs.feature_attention_mask is not None
    assert len(segments) == 2 and len(inputs.audio_keys) == 2
    for row, clip in enumerate((speech, speech[30 * 16_000 :])):
        official = processor_audio(Qwen2_5OmniProcessor, [clip])
        frames = int(official["feature_attention_mask"].sum())
        assert frames == int(inputs.feature_attention_mask[row].sum()) == [3000, 1501][row]
        assert segments[row].count("<|AUDIO|>") == int(official["num_audio_tokens"][0])
        torch.testing.assert_close(
            inputs.input_features[row, :, :frames], official["input_features"][0, :, :frames], rtol=0, atol=0
        )


@pytest.mark.slow
def test_an_image_in_the_conversation_is_seen_by_the_thinker(tiny_qwen2_5_dir: Path) -> None:
    """generate() itself cannot take images with audio output in transformers 5.23 (it passes pixel_values to the
    talker), so the streamed text is checked against the thinker's own generate()."""
    engine = started(tiny_qwen2_5_dir, max_text_tokens=12, max_audio_codes=60, **GREEDY)
    request = ResponseRequest(
        messages=(Message("user", (ImagePart(png_image(60, 90)), AudioPart(tone(1.0)))),),
        sampling=SamplingParams(temperature=0.0),
    )
    plan = engine.prepare(request)
    assert plan.inputs.image_grid_thw is not None and plan.inputs.image_grid_thw.tolist() == [[1, 4, 6]]
    assert engine.tokenizer.decode(plan.inputs.input_ids[0]).count("<|IMAGE|>") == 4 * 6 // 4
    generation, deltas = run_to_end(engine, request)
    with torch.inference_mode():
        expected = engine.model.thinker.generate(
            **plan.inputs.tensors(torch.device("cpu"), torch.float32),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=sorted(engine.text_eos_ids),
        )
    assert generation.text_ids == expected[0, plan.inputs.prompt_tokens :].tolist()
    assert len(pcm_of(deltas)) == SAMPLES_PER_CODE * len(generation.codes) > 0


def test_an_undecodable_image_is_a_clear_error(engine: Qwen25OmniEngine) -> None:
    request = ResponseRequest(messages=(Message("user", (ImagePart(b"not an image"),)),))
    with pytest.raises(EngineError, match="could not decode an image part"):
        engine.prepare(request)


@pytest.mark.slow
def test_the_latency_benchmark_runs_on_the_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    benchmark = importlib.import_module("benchmarks.engine_latency")
    arguments = ["--tiny", "--device", "cpu", "--text-tokens", "8", "--codes", "50", "--seconds", "1"]
    benchmark.main([*arguments, "--reps", "1", "--warmup", "0", "--sessions", "1,2", "--history", "0,1"])
    printed = capsys.readouterr().out
    for figure in (
        "thinker prefill",
        "thinker step",
        "talker step",
        "first audio",
        "RTF",
        "sustained",
        "continued: prefill",
        "caller transcript",
        "generate()",
    ):
        assert figure in printed
    continued_row = printed.split("continued: prefill")[1].splitlines()[2]  # the row of one earlier turn
    assert continued_row.split()[0] == "1" and continued_row.count(" ms") == 4


@pytest.mark.slow
def test_multi_turn_conversation_is_answered(engine: Qwen25OmniEngine) -> None:
    request = ResponseRequest(
        messages=(
            Message("user", (AudioPart(tone(1.0)),)),
            Message("assistant", (TextPart("Hello there"),)),
            Message("user", (AudioPart(tone(1.0, 330.0)),)),
        ),
        sampling=SamplingParams(temperature=0.0, max_tokens=5),
    )
    generation, deltas = run_to_end(engine, request)
    assert len(generation.text_ids) == 5
    assert len(pcm_of(deltas)) == SAMPLES_PER_CODE * len(generation.codes) > 0


def test_openai_voices_map_to_model_speakers() -> None:
    speakers = ["Chelsie", "Ethan"]
    assert resolve_speaker("alloy", speakers, "Ethan") == "Chelsie"
    assert resolve_speaker("echo", speakers, "Chelsie") == "Ethan"
    assert resolve_speaker("ethan", speakers, "Chelsie") == "Ethan"
    assert resolve_speaker("no-such-voice", speakers, "Ethan") == "Ethan"
    assert resolve_speaker("alloy", ["Ethan", "Aiden"], "Aiden") == "Aiden"


def test_incremental_text_never_splits_a_character(engine: Qwen25OmniEngine) -> None:
    tokenizer = engine.tokenizer
    ids = tokenizer("héllo → wörld", add_special_tokens=False).input_ids
    text = IncrementalText(tokenizer)
    deltas = [text.push(token) for token in ids] + [text.flush()]
    assert "".join(deltas) == "héllo → wörld"
    assert all("\ufffd" not in delta for delta in deltas)
    assert deltas[ids.index(tokenizer.convert_tokens_to_ids("Ã"))] == ""  # first byte of "é" is held back


@pytest.mark.parametrize(
    ("stops", "expected", "stopped"),
    [
        (("wör",), "héllo → ", True),
        (("o → w", "xyz"), "héll", True),
        (("→ x",), "héllo → wörld", False),  # a held-back beginning of a stop string is released at the end
        (("",), "héllo → wörld", False),
    ],
)
def test_incremental_text_ends_before_a_stop_string_even_across_tokens(
    engine: Qwen25OmniEngine, stops: tuple[str, ...], expected: str, stopped: bool
) -> None:
    tokenizer = engine.tokenizer
    text = IncrementalText(tokenizer, stops)
    deltas = [text.push(token) for token in tokenizer("héllo → wörld", add_special_tokens=False).input_ids]
    deltas.append(text.flush())
    assert "".join(deltas) == expected
    assert text.stopped is stopped


@pytest.mark.slow
def test_a_stop_string_ends_the_answer_and_its_speech(engine: Qwen25OmniEngine) -> None:
    _, free_deltas = run_to_end(engine, audio_turn(max_tokens=20))
    free_text = "".join(d.text for d in free_deltas if isinstance(d, TextDelta))
    stop = free_text[len(free_text) // 2 :][:2]
    generation, deltas = run_to_end(engine, audio_turn(max_tokens=20, stop=(stop,)))

    streamed = "".join(d.text for d in deltas if isinstance(d, TextDelta))
    assert streamed == free_text[: free_text.index(stop)]
    assert len(generation.text_ids) < 20
    assert len(pcm_of(deltas)) == SAMPLES_PER_CODE * len(generation.codes) > 0


class _Spy:
    """Wraps a generation and records when steps start and whether it was closed."""

    def __init__(self, inner: Qwen25Generation, first_step: threading.Event) -> None:
        self._inner = inner
        self._first_step = first_step
        self.step_starts: list[float] = []
        self.closed = threading.Event()

    @property
    def finished(self) -> bool:
        return self._inner.finished

    def step(self) -> list[Delta]:
        self.step_starts.append(time.perf_counter())
        deltas = self._inner.step()
        self._first_step.set()
        return deltas

    def close(self) -> None:
        self._inner.close()
        self.closed.set()


@pytest.mark.slow
async def test_cancelling_mid_answer_stops_at_once_and_frees_the_generation(tiny_qwen2_5_dir: Path) -> None:
    engine = Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", max_text_tokens=200, max_audio_codes=400)
    await engine.start()
    spies: list[_Spy] = []
    original = engine.make_generation

    def spied(prepared: TurnPlan) -> _Spy:
        spies.append(_Spy(original(prepared), threading.Event()))
        return spies[-1]

    engine.make_generation = spied  # type: ignore[method-assign]
    try:
        stream: AsyncIterator[Delta] = engine.respond(audio_turn(seed=1))
        received = [await anext(stream) for _ in range(3)]
        assert any(isinstance(d, TextDelta) for d in received)
        await stream.aclose()  # type: ignore[attr-defined]
        cancelled_at = time.perf_counter()
        assert await asyncio.to_thread(spies[0].closed.wait, 5.0)
        await asyncio.sleep(0.2)
        assert [start for start in spies[0].step_starts if start > cancelled_at] == []
        assert engine.load_info == (0, 0)
    finally:
        await engine.close()


async def test_responses_stream_through_the_worker_and_close_releases_the_model(tiny_qwen2_5_dir: Path) -> None:
    engine = Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", max_text_tokens=4, max_audio_codes=30)
    with pytest.raises(EngineNotReady):
        await anext(engine.respond(audio_turn()))
    await engine.start()
    assert engine.ready
    assert isinstance(engine, Engine)
    assert (engine.name, engine.native_rate) == ("qwen2.5-omni", 24_000)
    deltas = [d async for d in engine.respond(audio_turn())]
    assert isinstance(deltas[-1], Usage)
    assert sum(len(d.pcm) for d in deltas if isinstance(d, AudioDelta)) % SAMPLES_PER_CODE == 0
    await engine.close()
    assert not engine.ready
    with pytest.raises(EngineError):
        _ = engine.model


async def test_running_out_of_memory_fails_the_request_gives_up_stored_prompts_and_serves_on(
    tiny_qwen2_5_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", max_text_tokens=4, max_audio_codes=30)
    await engine.start()
    try:
        _ = [d async for d in engine.respond(replace(audio_turn(), conversation_id="call-1"))]
        assert len(engine.prefixes) == 1
        real_prefill = Qwen25Generation._encode_prompt

        def out_of_memory(*args: Any) -> Any:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

        monkeypatch.setattr(Qwen25Generation, "_encode_prompt", out_of_memory)
        with pytest.raises(EngineOutOfMemory):
            _ = [d async for d in engine.respond(audio_turn())]
        assert len(engine.prefixes) == 0
        monkeypatch.setattr(Qwen25Generation, "_encode_prompt", real_prefill)
        deltas = [d async for d in engine.respond(audio_turn())]
        assert isinstance(deltas[-1], Usage)
    finally:
        await engine.close()


async def test_a_missing_or_incomplete_checkpoint_is_a_clear_error(tmp_path: Path, tiny_qwen2_5_dir: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(EngineError, match="nowhere"):
        await Qwen25OmniEngine(str(missing), device="cpu").start()
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (incomplete / name).write_bytes((tiny_qwen2_5_dir / name).read_bytes())
    with pytest.raises(EngineError, match=r"incomplete.*missing: spk_dict\.pt"):
        await Qwen25OmniEngine(str(incomplete), device="cpu").start()
    (incomplete / "model.safetensors").unlink()
    (incomplete / "spk_dict.pt").write_bytes((tiny_qwen2_5_dir / "spk_dict.pt").read_bytes())
    with pytest.raises(EngineError, match=r"incomplete.*missing: weights"):
        await Qwen25OmniEngine(str(incomplete), device="cpu").start()


def test_bad_options_are_clear_errors(tiny_qwen2_5_dir: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match=r"device is 'cuda'.*no CUDA GPU"):
            Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cuda")
    with pytest.raises(EngineError, match=r"unknown engine option.*'voices'"):
        Qwen25OmniEngine(str(tiny_qwen2_5_dir), voices="Ethan")
    with pytest.raises(EngineError, match="dit_dtype"):
        Qwen25OmniEngine(str(tiny_qwen2_5_dir), dit_dtype="float8")
    with pytest.raises(EngineError, match="dtype must be one of"):
        Qwen25OmniEngine(str(tiny_qwen2_5_dir), dtype="fp4")
    with pytest.raises(EngineError, match="cuda_graphs needs static_cache"):
        Qwen25OmniEngine(str(tiny_qwen2_5_dir), cuda_graphs=True)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="cuda_graphs needs a CUDA device"):
            Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", static_cache=True, cuda_graphs=True)
        with pytest.raises(EngineError, match="dit_cuda_graph needs a CUDA device"):
            Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", dit_cuda_graph=True)


async def test_a_voice_the_checkpoint_lacks_is_refused_at_start(tiny_qwen2_5_dir: Path) -> None:
    with pytest.raises(EngineError, match="voice 'Aiden' is not a speaker"):
        await Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", voice="Aiden").start()


def test_a_transcription_prompt_holds_the_instruction_the_audio_and_the_hints(engine: Qwen25OmniEngine) -> None:
    request = transcription_request(tone(2.0), "fr", "Omnivox, Qwen")
    plan: TurnPlan = engine.prepare(request)
    prompt = engine.tokenizer.decode(plan.inputs.input_ids[0])
    user_turn = prompt.split("<|im_start|>user\n")[1]
    assert user_turn.startswith("<|audio_bos|>" + "<|AUDIO|>" * 50 + "<|audio_eos|>" + TRANSCRIPTION_INSTRUCTION)
    assert "'fr'" in user_turn and "Omnivox, Qwen" in user_turn
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert (plan.output_audio, plan.text_sampling.temperature) == (False, 0.0)
    assert plan.max_text_tokens >= TRANSCRIPTION_MIN_TOKENS
    assert TRANSCRIPTION_INSTRUCTION in engine.tokenizer.decode(
        engine.prepare(transcription_request(tone(1))).inputs.input_ids[0]
    )


async def until_idle(engine: Qwen25OmniEngine) -> None:
    """The worker retires a generation just after closing it: wait (bounded) until nothing is active or queued."""
    deadline = time.monotonic() + 5
    while engine.load_info != (0, 0):
        assert time.monotonic() < deadline, f"the worker still holds {engine.load_info}"
        await asyncio.sleep(0.01)


class _Gated(_Spy):
    """A spy whose steps wait until the test opens the gate, so it stays active on the worker as long as needed."""

    def __init__(self, inner: Qwen25Generation, first_step: threading.Event, gate: threading.Event) -> None:
        super().__init__(inner, first_step)
        self._gate = gate

    def step(self) -> list[Delta]:
        self.step_starts.append(time.perf_counter())
        self._gate.wait(10)
        return self._inner.step()


async def test_transcription_runs_on_the_worker_counts_against_the_queue_and_cancels(tiny_qwen2_5_dir: Path) -> None:
    engine = Qwen25OmniEngine(str(tiny_qwen2_5_dir), device="cpu", max_active=1, max_queued=1)
    await engine.start()
    gate, first_step = threading.Event(), threading.Event()
    spies: list[_Gated] = []
    original = engine.make_generation
    step_threads: list[str] = []

    def spied(prepared: TurnPlan) -> _Gated:
        step_threads.append(threading.current_thread().name)
        spies.append(_Gated(original(prepared), first_step, gate))
        return spies[-1]

    engine.make_generation = spied  # type: ignore[method-assign]
    try:
        gate.set()
        text = await engine.transcribe(tone(1.0), "en", "a tone")
        assert isinstance(text, str) and text == text.strip()
        assert len(spies) == 1 and step_threads[0] != threading.current_thread().name
        assert await asyncio.to_thread(spies[0].closed.wait, 5.0)
        await until_idle(engine)
        assert await engine.transcribe(np.zeros(0, dtype=np.float32)) == ""
        assert len(spies) == 1  # nothing to recognise never reaches the model

        gate.clear()
        first_step.clear()
        held = asyncio.create_task(engine.transcribe(tone(1.0)))
        while engine.load_info != (1, 0):
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(engine.transcribe(tone(1.0)))
        while engine.load_info != (1, 1):
            await asyncio.sleep(0.01)
        with pytest.raises(EngineBusy):
            await engine.transcribe(tone(1.0))
        queued.cancel()
        held.cancel()
        cancelled_at = time.perf_counter()
        gate.set()
        assert await asyncio.to_thread(spies[1].closed.wait, 5.0)
        await until_idle(engine)
        assert [start for start in spies[1].step_starts if start > cancelled_at] == []
        assert len(spies) == 2  # the cancelled queued request never started
        for task in (held, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        gate.set()
        await engine.close()
