"""Audio plumbing: conversions, streaming resampling, G.711, framing, wire formats, files and synthesised speech."""

from __future__ import annotations

import io
import warnings
import wave

import numpy as np
import pytest
import soundfile

from omnivox.pipeline.audio import (
    G711_ALAW,
    G711_ULAW,
    PCM16,
    AudioFormat,
    Framer,
    StreamResampler,
    alaw_decode,
    alaw_encode,
    audio_format,
    decode_audio_file,
    encode_audio_file,
    float_to_pcm16,
    mulaw_decode,
    mulaw_encode,
    pcm16_to_float,
    read_wav,
    synthesize_speech,
    write_wav,
)

RATES = (8_000, 16_000, 24_000, 48_000)
ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


def sine(rate: int, seconds: float, hz: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def as_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768


# ------------------------------------------------------------------------------------------------- PCM16


def test_pcm16_round_trip_is_exact_for_every_int16_value() -> None:
    data = ALL_INT16.astype("<i2").tobytes()
    samples = pcm16_to_float(data)
    assert samples.dtype == np.float32
    assert samples.min() == -1.0 and samples.max() < 1.0
    assert float_to_pcm16(samples) == data


def test_pcm16_is_little_endian() -> None:
    assert float_to_pcm16(np.array([0.5], dtype=np.float32)) == b"\x00\x40"
    assert pcm16_to_float(b"\x00\xc0")[0] == -0.5


def test_float_to_pcm16_clips_instead_of_wrapping() -> None:
    pcm = np.frombuffer(float_to_pcm16(np.array([1.5, -3.0, 1.0], dtype=np.float32)), dtype="<i2")
    assert pcm.tolist() == [32767, -32768, 32767]


def test_pcm16_to_float_rejects_odd_length() -> None:
    with pytest.raises(ValueError, match="even"):
        pcm16_to_float(b"\x00\x01\x02")


# ------------------------------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("in_rate", RATES)
@pytest.mark.parametrize("out_rate", RATES)
def test_chunked_resampling_equals_whole_and_has_the_right_length(in_rate: int, out_rate: int) -> None:
    signal = sine(in_rate, 1.0)
    whole_resampler = StreamResampler(in_rate, out_rate)
    whole = np.concatenate((whole_resampler.process(signal), whole_resampler.flush()))
    chunk = in_rate // 50  # 20 ms, the size the doors feed
    chunked_resampler = StreamResampler(in_rate, out_rate)
    pieces = [chunked_resampler.process(signal[start : start + chunk]) for start in range(0, len(signal), chunk)]
    streamed = sum(len(piece) for piece in pieces)
    chunked = np.concatenate([*pieces, chunked_resampler.flush()])

    assert len(chunked) == len(whole) == out_rate
    # What the filter holds back until flush is latency every caller's barge-in pays.
    assert (out_rate - streamed) / out_rate < 0.040
    assert np.max(np.abs(chunked - whole)) < 1e-4
    # A 440 Hz sine at amplitude 0.5 changes by at most 2*pi*440*0.5/rate per sample; a click at a join would not.
    max_step = 2 * np.pi * 440 * 0.5 / out_rate
    assert np.max(np.abs(np.diff(chunked[out_rate // 10 : -out_rate // 10]))) < 1.05 * max_step


@pytest.mark.parametrize(("in_rate", "out_rate"), [(24_000, 8_000), (8_000, 16_000), (48_000, 16_000)])
def test_resampling_keeps_the_tone(in_rate: int, out_rate: int) -> None:
    resampler = StreamResampler(in_rate, out_rate)
    out = np.concatenate((resampler.process(sine(in_rate, 1.0, hz=1000.0)), resampler.flush()))
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) * out_rate / len(out) == pytest.approx(1000.0, abs=2.0)
    assert np.sqrt(np.mean(out[out_rate // 10 : -out_rate // 10] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_downsampling_removes_tones_above_the_new_nyquist() -> None:
    resampler = StreamResampler(24_000, 8_000)
    out = np.concatenate((resampler.process(sine(24_000, 1.0, hz=6_000.0)), resampler.flush()))
    assert np.sqrt(np.mean(out[800:-800] ** 2)) < 0.01 * 0.5


def test_equal_rates_pass_samples_through() -> None:
    resampler = StreamResampler(16_000, 16_000)
    signal = sine(16_000, 0.1)
    assert np.array_equal(resampler.process(signal), signal)
    assert len(resampler.flush()) == 0


# ------------------------------------------------------------------------------------------------- G.711


def test_mulaw_known_code_points() -> None:
    assert mulaw_encode(np.zeros(1, dtype=np.float32)) == b"\xff"
    assert mulaw_encode(np.array([1.0, -1.0], dtype=np.float32)) == b"\x80\x00"
    decoded = mulaw_decode(bytes([0x00, 0x80, 0xFF, 0x7F, 0x7E, 0xFE])) * 32768
    assert decoded.tolist() == [-32124, 32124, 0, 0, -8, 8]


def test_alaw_known_code_points() -> None:
    assert alaw_encode(np.zeros(1, dtype=np.float32)) == b"\xd5"
    assert alaw_encode(np.array([1.0, -1.0], dtype=np.float32)) == b"\xaa\x2a"
    decoded = alaw_decode(bytes([0xD5, 0x55, 0xAA, 0x2A])) * 32768
    assert decoded.tolist() == [8, -8, 32256, -32256]


@pytest.mark.parametrize(("encode", "decode"), [(mulaw_encode, mulaw_decode), (alaw_encode, alaw_decode)])
def test_g711_decode_then_encode_returns_every_code(encode, decode) -> None:
    codes = bytes(range(256))
    reencoded = encode(decode(codes))
    # mu-law has two codes for zero (0x7F and 0xFF); encoding zero yields the positive one.
    expected = codes.replace(b"\x7f", b"\xff") if encode is mulaw_encode else codes
    assert reencoded == expected


@pytest.mark.parametrize(("encode", "decode"), [(mulaw_encode, mulaw_decode), (alaw_encode, alaw_decode)])
def test_g711_round_trip_error_is_within_the_companding_step(encode, decode) -> None:
    signal = sine(8_000, 0.5, hz=300.0, amplitude=0.8)
    decoded = decode(encode(signal))
    relative_error = np.abs(decoded - signal) / np.maximum(np.abs(signal), 1 / 256)
    assert decoded.dtype == np.float32 and len(decoded) == len(signal)
    assert np.max(relative_error) < 0.07


def test_g711_matches_audioop_for_every_int16_value() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop", reason="audioop is gone from Python 3.13")
    samples, data = as_float(ALL_INT16), ALL_INT16.astype("<i2").tobytes()
    assert mulaw_encode(samples) == audioop.lin2ulaw(data, 2)
    assert alaw_encode(samples) == audioop.lin2alaw(data, 2)
    codes = bytes(range(256))
    assert float_to_pcm16(mulaw_decode(codes)) == audioop.ulaw2lin(codes, 2)
    assert float_to_pcm16(alaw_decode(codes)) == audioop.alaw2lin(codes, 2)


# ------------------------------------------------------------------------------------------------- framing


def test_framer_cuts_exact_frames_and_carries_the_rest_over() -> None:
    framer = Framer(320)
    signal = np.arange(1000, dtype=np.float32)
    first = framer.push(signal[:300])
    assert first == [] and framer.pending == 300
    second = framer.push(signal[300:1000])
    assert [len(frame) for frame in second] == [320, 320, 320]
    assert np.array_equal(np.concatenate(second), signal[:960])
    assert framer.pending == 40
    remainder = framer.flush()
    assert remainder is not None and np.array_equal(remainder, signal[960:])
    assert framer.pending == 0 and framer.flush() is None


def test_framer_frames_do_not_alias_later_input() -> None:
    framer = Framer(4)
    chunk = np.ones(6, dtype=np.float32)
    (frame,) = framer.push(chunk)
    chunk[:] = 7
    framer.push(np.zeros(2, dtype=np.float32))
    assert frame.tolist() == [1, 1, 1, 1]


def test_framer_rejects_non_positive_frame_size() -> None:
    with pytest.raises(ValueError):
        Framer(0)


# ------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pcm16", PCM16),
        ("audio/pcm", PCM16),
        ("g711_ulaw", G711_ULAW),
        ("audio/pcmu", G711_ULAW),
        ("g711_alaw", G711_ALAW),
        ("audio/pcma", G711_ALAW),
    ],
)
def test_audio_format_accepts_beta_and_ga_names(name: str, expected: AudioFormat) -> None:
    assert audio_format(name) is expected


def test_audio_format_rejects_unknown_names_naming_the_value() -> None:
    with pytest.raises(ValueError, match="'audio/opus'"):
        audio_format("audio/opus")


def test_audio_format_cannot_be_built_for_an_unknown_codec() -> None:
    with pytest.raises(ValueError, match="'g722'"):
        AudioFormat("g722", 16_000, 1)


def test_audio_format_rates_and_durations() -> None:
    assert (PCM16.rate, PCM16.bytes_per_sample) == (24_000, 2)
    assert (G711_ULAW.rate, G711_ALAW.rate) == (8_000, 8_000)
    assert PCM16.duration_ms(960) == 20.0
    assert G711_ULAW.duration_ms(160) == 20.0
    assert G711_ALAW.duration_ms(8_000) == 1000.0


@pytest.mark.parametrize("fmt", [PCM16, G711_ULAW, G711_ALAW])
def test_audio_format_encode_decode_round_trip(fmt: AudioFormat) -> None:
    signal = sine(fmt.rate, 0.04, amplitude=0.6)
    wire = fmt.encode(signal)
    assert len(wire) == len(signal) * fmt.bytes_per_sample
    assert fmt.duration_ms(len(wire)) == pytest.approx(40.0)
    decoded = fmt.decode(wire)
    assert decoded.dtype == np.float32
    assert np.max(np.abs(decoded - signal)) < (1e-4 if fmt is PCM16 else 0.02)


def test_g711_formats_use_their_own_law() -> None:
    signal = sine(8_000, 0.02)
    assert G711_ULAW.encode(signal) == mulaw_encode(signal)
    assert G711_ALAW.encode(signal) == alaw_encode(signal)
    assert G711_ULAW.encode(signal) != G711_ALAW.encode(signal)


# ------------------------------------------------------------------------------------------------- files


def test_wav_round_trip_and_stereo_downmix(tmp_path) -> None:
    left, right = sine(16_000, 0.2, amplitude=0.4), sine(16_000, 0.2, hz=880.0, amplitude=0.2)
    write_wav(tmp_path / "mono.wav", left, 16_000)
    samples, rate = read_wav(tmp_path / "mono.wav")
    assert rate == 16_000 and np.max(np.abs(samples - left)) < 1e-4

    write_wav(tmp_path / "stereo.wav", np.stack((left, right), axis=1), 48_000, channels=2)
    samples, rate = read_wav(tmp_path / "stereo.wav")
    assert rate == 48_000 and samples.shape == left.shape
    assert np.max(np.abs(samples - (left + right) / 2)) < 1e-4


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_encoded_files_decode_back_to_the_same_sound(fmt: str) -> None:
    signal = sine(24_000, 0.5, hz=500.0, amplitude=0.5)
    data = encode_audio_file(signal, 24_000, fmt)
    decoded, rate = decode_audio_file(data)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert rate == (48_000 if fmt == "opus" else 24_000)
    # Lossy codecs add padding; the duration and the tone must survive.
    assert len(decoded) / rate == pytest.approx(0.5, abs=0.1)
    spectrum = np.abs(np.fft.rfft(decoded))
    assert np.argmax(spectrum) * rate / len(decoded) == pytest.approx(500.0, abs=5.0)
    if fmt in ("wav", "flac"):
        assert np.max(np.abs(decoded - signal)) < 1e-4


def test_pcm16_wav_is_read_without_ffmpeg_and_other_wavs_still_decode() -> None:
    signal = sine(16_000, 0.5)
    pcm16 = encode_audio_file(signal, 16_000, "wav")
    stereo = io.BytesIO()
    with wave.open(stereo, "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(16_000)
        writer.writeframes(float_to_pcm16(np.stack([signal, signal], axis=1).reshape(-1)))
    for data in (pcm16, stereo.getvalue()):
        decoded, rate = decode_audio_file(data)
        assert rate == 16_000 and decoded.size == signal.size
        assert np.max(np.abs(decoded - signal)) < 1e-4
    floats = io.BytesIO()
    soundfile.write(floats, signal, 16_000, format="WAV", subtype="FLOAT")
    decoded, rate = decode_audio_file(floats.getvalue())  # not PCM16: FFmpeg reads it
    assert rate == 16_000 and np.max(np.abs(decoded - signal)) < 1e-6
    with pytest.raises(ValueError):
        decode_audio_file(pcm16[:44] + b"\x01")  # a header and half a sample


def test_pcm16_output_is_raw_samples() -> None:
    signal = sine(16_000, 0.1)
    assert encode_audio_file(signal, 16_000, "pcm16") == float_to_pcm16(signal)


def test_unknown_output_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="'aac'"):
        encode_audio_file(sine(16_000, 0.1), 16_000, "aac")


def test_undecodable_input_gives_a_clear_error() -> None:
    with pytest.raises(ValueError, match="could not decode audio"):
        decode_audio_file(b"this is not audio at all" * 10)


# ------------------------------------------------------------------------------------------------- speech


def test_synthesize_speech_sounds_like_speech() -> None:
    speech = synthesize_speech("Hello, I would like to book a table for two.", rate=16_000)
    assert speech.dtype == np.float32
    assert 1.5 < len(speech) / 16_000 < 5.0
    frame_energy = np.sqrt(np.mean(speech[: len(speech) // 320 * 320].reshape(-1, 320) ** 2, axis=1))
    assert np.mean(frame_energy > 0.01) > 0.5  # mostly voiced
    assert np.max(np.abs(speech)) <= 1.0


def test_synthesize_speech_rate_and_speed() -> None:
    text = "The quick brown fox jumps over the lazy dog."
    at_16k = synthesize_speech(text, rate=16_000)
    at_24k = synthesize_speech(text, rate=24_000)
    assert len(at_24k) / 24_000 == pytest.approx(len(at_16k) / 16_000, abs=0.01)
    faster = synthesize_speech(text, rate=16_000, words_per_minute=320)
    assert len(faster) < 0.7 * len(at_16k)


def test_synthesize_speech_without_espeak_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr("omnivox.pipeline.audio.shutil.which", lambda _name: None)
    with pytest.raises(RuntimeError, match="espeak-ng"):
        synthesize_speech("hello")
