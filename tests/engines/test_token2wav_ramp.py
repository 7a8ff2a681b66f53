"""Token2WavStream's chunk-size ramp and the playout simulator: an early first chunk with no gap after it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import test_qwen2_5_omni
import torch

from omnivox.pipeline.engines.qwen2_5_omni import Qwen25OmniEngine
from omnivox.pipeline.engines.qwen2_5_token2wav import (
    RECOMMENDED_CHUNK_RAMP_MEL,
    RECOMMENDED_FIRST_CHUNK_CODES,
    PlannedChunk,
    Token2WavStream,
    plan_chunks,
    simulate_playout,
)

engine = test_qwen2_5_omni.engine  # the tiny model, started once for this module too
SAMPLES_PER_CODE = test_qwen2_5_omni.SAMPLES_PER_CODE
RAMP = RECOMMENDED_CHUNK_RAMP_MEL
FIRST = RECOMMENDED_FIRST_CHUNK_CODES
CODE = 0.02  # seconds of speech per code
DIT_CHUNK = 0.056  # seconds per vocoder chunk on an H100 (DiT bf16, 5 steps, CUDA graph)


def random_codes(count: int) -> list[int]:
    return [int(c) for c in torch.randint(0, 8192, (count,), generator=torch.Generator().manual_seed(count))]


def make_stream(
    engine: Qwen25OmniEngine, max_codes: int, first: int = 48, ramp: tuple[int, ...] = ()
) -> Token2WavStream:
    return Token2WavStream(
        engine.model.token2wav,
        engine.dit_solver,
        voice=engine.voices["Chelsie"],
        max_codes=max_codes,
        generator=torch.Generator().manual_seed(3),
        first_chunk_codes=first,
        chunk_ramp_mel=ramp,
    )


def voice(stream: Token2WavStream, codes: list[int]) -> list[tuple[int, np.ndarray]]:
    """Every chunk with the number of codes pushed when it came out (the last at flush)."""
    chunks = []
    with torch.inference_mode():
        for count, code in enumerate(codes, start=1):
            chunks += [(count, pcm) for pcm in stream.push(code)]
        chunks += [(len(codes), pcm) for pcm in stream.flush()]
    return chunks


def record_windows(stream: Token2WavStream, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(start, end) in mel of the noise slice of every DiT run, i.e. its window."""
    windows: list[tuple[int, int]] = []
    denoise = stream.denoise

    def recording(noise: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        start = noise.storage_offset() // noise.shape[2]
        windows.append((start, start + noise.shape[1]))
        return denoise(noise, codes)

    monkeypatch.setattr(stream, "denoise", recording)
    return windows


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "ramp", "count"),
    [
        (FIRST, RAMP, 24),  # the first chunk ends on the last code: only its held-back BigVGAN edge is left at flush
        (FIRST, RAMP, 48),  # the second chunk fires on the last code
        (FIRST, RAMP, 61),
        (FIRST, RAMP, 97),
        (FIRST, RAMP, 133),
        (20, (48, 24, 72), 91),
        (40, (24,), 70),
    ],
)
def test_ramped_stream_is_480_samples_per_code_in_the_planned_chunks(
    engine: Qwen25OmniEngine, monkeypatch: pytest.MonkeyPatch, first: int, ramp: tuple[int, ...], count: int
) -> None:
    """What the playout simulator plans is what the stream does; every DiT window but the last is a graphed one."""
    stream = make_stream(engine, count, first, ramp)
    windows = record_windows(stream, monkeypatch)
    chunks = voice(stream, random_codes(count))
    assert sum(len(pcm) for _, pcm in chunks) == SAMPLES_PER_CODE * count
    planned = plan_chunks(count, first, ramp)
    assert [(codes, len(pcm)) for codes, pcm in chunks] == [
        (chunk.codes, chunk.mel * stream.samples_per_mel) for chunk in planned
    ]
    assert [end - start for start, end in windows] == [chunk.window for chunk in planned if chunk.window]
    pushed = windows[:-1] if planned[-1].window else windows  # the flush's window fits the utterance's end
    assert {end - start for start, end in pushed} <= set(Token2WavStream.regular_windows(first, ramp))


@pytest.mark.slow
def test_ramped_stream_joins_like_the_whole_utterance_and_the_official_schedule(engine: Qwen25OmniEngine) -> None:
    """Same noise, so chunking only approximates the whole-utterance DiT: each ramp chunk must join without a step.
    The error bound is the official schedule's own (test_vocoder_stream_is_480_samples_per_code_and_joins_smoothly)."""
    codes = random_codes(157)
    ramped = voice(make_stream(engine, len(codes), FIRST, RAMP), codes)
    official = np.concatenate([pcm for _, pcm in voice(make_stream(engine, len(codes)), codes)])
    stream = make_stream(engine, len(codes))
    with torch.inference_mode():
        whole = stream.vocode(stream.denoise(stream.noise, torch.tensor([codes]))).numpy()
    streamed = np.concatenate([pcm for _, pcm in ramped])
    assert len(ramped) == 7  # 48 mel, the ramp's 24, 24 and 48, two of 72, and the rest at flush
    assert len(streamed) == len(whole) == len(official)
    for reference in (whole, official):
        assert np.abs(streamed - reference).max() / np.abs(reference).max() < 1e-3


@pytest.mark.slow
def test_default_schedule_is_the_official_one_and_a_ramp_of_72s_changes_nothing(
    engine: Qwen25OmniEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ramp: chunk i keeps [72i, 72i+72) in the DiT window [72i-48, 72i+96), voiced once 36i+48 codes exist."""
    codes = random_codes(157)
    stream = make_stream(engine, len(codes))
    windows = record_windows(stream, monkeypatch)
    default = voice(stream, codes)
    assert [count for count, _ in default] == [48, 84, 120, 156, 157]
    assert windows == [(0, 96), (24, 168), (96, 240), (168, 312), (240, 314)]
    explicit = voice(make_stream(engine, len(codes), 48, (72, 72)), codes)
    assert len(explicit) == len(default)
    for (count, pcm), (explicit_count, explicit_pcm) in zip(default, explicit, strict=True):
        assert count == explicit_count and np.array_equal(pcm, explicit_pcm)
    assert Token2WavStream.regular_windows(48) == (96, 144)


def test_regular_windows_are_every_window_of_a_long_utterance() -> None:
    for first, ramp in [(48, ()), (24, ()), (20, ()), (24, RECOMMENDED_CHUNK_RAMP_MEL), (20, (24, 24, 24, 48))]:
        windows = {bounds.window for bounds in itertools.islice(Token2WavStream.schedule(first, ramp), 60)}
        assert Token2WavStream.regular_windows(first, ramp) == tuple(sorted(windows))
    assert Token2WavStream.regular_windows(24, RECOMMENDED_CHUNK_RAMP_MEL) == (48, 96, 120, 144)


@pytest.mark.parametrize(
    ("first", "ramp"), [(19, ()), (24, (0,)), (24, (12,)), (24, (25,)), (24, (24, 96)), (24, (-24,))]
)
def test_a_schedule_must_outlast_the_overlap_and_keep_whole_dit_blocks(first: int, ramp: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"first_chunk_codes|chunk_ramp_mel"):
        Token2WavStream.schedule(first, ramp)


def test_playout_plays_chunks_as_they_are_made_and_the_vocoder_holds_up_the_codes() -> None:
    chunks = [PlannedChunk(codes=2, window=10, mel=10), PlannedChunk(4, 10, 10), PlannedChunk(5, 0, 5)]
    # made at 0.2 s, plays to 0.3; made at 0.2 + 0.1 + 0.1 = 0.4: 0.1 s gap, plays to 0.5; edge at 0.45, no vocoder
    playout = simulate_playout(chunks, 0.05, 0.1, start_seconds=1.0)
    assert playout.first_audio == pytest.approx(1.2)
    assert len(playout.gaps) == 1
    assert playout.gaps[0] == pytest.approx((1.3, 0.1))
    with pytest.raises(ValueError, match="no chunks"):
        simulate_playout([], 0.05, 0.1)


@pytest.mark.parametrize("rtf", [0.3, 0.45])
def test_a_24_code_first_chunk_without_a_ramp_stalls_once_its_028_s_run_out(rtf: float) -> None:
    playout = simulate_playout(plan_chunks(250, first_chunk_codes=24), rtf * CODE, DIT_CHUNK)
    first_audio = 24 * rtf * CODE + DIT_CHUNK
    assert playout.first_audio == pytest.approx(first_audio)
    second_chunk = first_audio + 48 * rtf * CODE + DIT_CHUNK  # 72 mel kept + 24 of look-ahead after 48
    assert len(playout.gaps) == 1
    assert playout.gaps[0] == pytest.approx((first_audio + 0.28, second_chunk - first_audio - 0.28))


@pytest.mark.parametrize("rtf", [0.3, 0.45])
def test_the_recommended_ramp_starts_as_early_and_never_stalls(rtf: float) -> None:
    for count in range(FIRST, 400):
        playout = simulate_playout(plan_chunks(count, FIRST, RAMP), rtf * CODE, DIT_CHUNK)
        assert playout.gaps == (), count
        assert playout.first_audio == pytest.approx(24 * rtf * CODE + DIT_CHUNK)
    official = simulate_playout(plan_chunks(400), rtf * CODE, DIT_CHUNK)
    assert official.gaps == () and official.first_audio == pytest.approx(48 * rtf * CODE + DIT_CHUNK)


def test_the_recommended_ramp_stalls_where_24_codes_and_a_chunk_outlast_the_first_chunk() -> None:
    """The ramp's limit: the second chunk needs 24 more codes and a vocoder run within the first chunk's 0.28 s."""
    slow = simulate_playout(plan_chunks(400, FIRST, RAMP), 0.0125, DIT_CHUNK)
    assert slow.gaps[0] == pytest.approx((slow.first_audio + 0.28, 24 * 0.0125 + DIT_CHUNK - 0.28))
