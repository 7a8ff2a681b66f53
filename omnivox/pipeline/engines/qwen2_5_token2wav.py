"""Qwen2.5-Omni's token2wav (flow-matching DiT + BigVGAN) as a stream: codec codes in, 24 kHz PCM out per chunk.

transformers runs token2wav on the whole utterance only; this module re-implements the official streaming schedule
so speech can start while the talker is still writing codes.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

log = logging.getLogger(__name__)

ENGINE_NAME = "qwen2.5-omni"


class Voice(NamedTuple):
    """One speaker's conditioning of the DiT, computed once (`DitSolver.voice`), float32, both halves of the
    classifier-free guidance batch: the speaker's own, then the unconditioned one the model pairs it with."""

    speaker: torch.Tensor
    """`[2, C]` the speaker's conditioning vector (`spk_dict.pt` "cond"), then zeros."""
    reference: torch.Tensor
    """`[2, E]` the DiT's speaker encoder (ECAPA-TDNN) over the speaker's reference mel, then over silence of the
    same length. `DiT.forward` recomputes both at every call (36 per chunk at 10 steps) though they never change."""


def cast_dit(dit: torch.nn.Module, dtype: torch.dtype) -> None:
    """The DiT's transformer in `dtype`; its time embedding and speaker encoder float32 whatever that is.

    The ODE time reaches a sinusoidal embedding scaled by 1000: as a bf16 scalar it is up to 2e-3 off, which is
    radians of phase at the highest frequencies. The speaker encoder runs once per voice, so its precision is free.
    """
    dit.to(dtype)
    dit.time_embed.float()
    dit.input_embed.spk_encoder.float()


class DitSolver:
    """The DiT's flow-matching ODE from a caller-given noise window (`DiT.sample()` draws its own noise).

    RK4 over `steps` time points with the sway schedule and classifier-free guidance 0.5, as `DiT.sample()`. Each
    velocity is the DiT's forward with the speaker parts precomputed (`Voice`) and the time embedding in float32
    (`velocity`); the ODE state stays float32 whatever the DiT's dtype. Time points are Python floats, so an
    integration never waits for the device and can be captured.

    `fixed_lengths` (the schedule's regular windows) are the only window lengths run: a shorter window, the last
    chunk of an utterance, is padded to the next of them with frames it cannot see (attention is the DiT's only
    mixing across frames, and the padding is masked out of it both ways), so its mel is the same and its cost
    bounded. With `graphs` each fixed length is captured once as one CUDA graph and replayed.
    """

    GUIDANCE_SCALE = 0.5
    SWAY_COEFFICIENT = -1.0
    OUT_OF_REACH = 1 << 20
    """A block distance no attention layer looks across: keeps padding and real frames apart."""

    def __init__(
        self, dit: torch.nn.Module, *, steps: int, fixed_lengths: tuple[int, ...] = (), graphs: bool = False
    ) -> None:
        self._dit = dit
        self.dtype = dit.proj_out.weight.dtype
        uniform = [index / (steps - 1) for index in range(steps)]
        self._times = [t + self.SWAY_COEFFICIENT * (math.cos(math.pi / 2 * t) - 1 + t) for t in uniform]
        self._graphs = graphs
        self._fixed_lengths = tuple(sorted(fixed_lengths))
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    @torch.inference_mode()
    def voice(self, conditioning: torch.Tensor, reference_mel: torch.Tensor) -> Voice:
        """A speaker's `Voice` from its conditioning `[1, C]` and reference mel `[1, R, mel]`."""
        encoder = self._dit.input_embed.spk_encoder
        mels = torch.cat([reference_mel, torch.zeros_like(reference_mel)]).float()
        speaker = conditioning.float()
        return Voice(torch.cat([speaker, torch.zeros_like(speaker)]), encoder(mels).float())

    def solve(self, noise: torch.Tensor, codes: torch.Tensor, voice: Voice) -> torch.Tensor:
        """noise `[1, T, mel]` float32, codes `[1, T/2]`, the speaker's `Voice` -> mel `[1, mel, T]` float32."""
        length = noise.shape[1]
        fixed = next((size for size in self._fixed_lengths if size >= length), None)
        if fixed is None:
            return self._integrate(noise, codes, voice, None)
        valid = torch.tensor(length, device=noise.device)
        noise = torch.nn.functional.pad(noise, (0, 0, 0, fixed - length))
        codes = torch.nn.functional.pad(codes, (0, (fixed - length) // Token2WavStream.MEL_PER_CODE))
        inputs = (noise, codes, voice.speaker, voice.reference, valid)
        if not self._graphs:
            return self._integrate(noise, codes, voice, valid)[:, :, :length]
        if fixed not in self._captured:
            self._captured[fixed] = self._capture(inputs)
        graph, buffers, output = self._captured[fixed]
        for buffer, value in zip(buffers, inputs, strict=True):
            buffer.copy_(value)
        graph.replay()
        return output[:, :, :length].clone()

    def velocity(
        self,
        state: torch.Tensor,
        codes: torch.Tensor,
        voice: Voice,
        time: float,
        block_diff: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The guided velocity `[1, T, mel]` float32 at `time` of a state `[1, T, mel]`: `DiT.forward(...,
        apply_cfg=True)` and the guidance, with the speaker parts from `voice` and the time embedding in float32.
        `block_diff` (`block_distances`) may mark padding; by default every frame is real."""
        dit, dtype, frames = self._dit, self.dtype, state.shape[1]
        if block_diff is None:
            block_diff = self.block_distances(frames, None, state.device)
        times = torch.full((2,), time, device=state.device, dtype=torch.float32)
        time_embedding = dit.time_embed(times).to(dtype)
        code_embedding = torch.cat([dit.text_embed(codes), dit.text_embed(codes, drop_code=True)])
        hidden = dit.input_embed.proj(
            torch.cat(
                (
                    torch.cat([state, state]).to(dtype),
                    voice.reference.to(dtype)[:, None].expand(-1, frames, -1),
                    code_embedding,
                    voice.speaker.to(dtype)[:, None].expand(-1, frames, -1),
                ),
                dim=-1,
            )
        )
        positions = torch.arange(frames, device=state.device)[None].expand(2, -1)
        position_embeddings = dit.rotary_embed(hidden, positions)
        for block in dit.transformer_blocks:
            hidden = block(hidden, time_embedding, position_embeddings=position_embeddings, block_diff=block_diff)
        output = dit.proj_out(dit.norm_out(hidden, time_embedding)).float()
        guided, unguided = torch.chunk(output, 2, dim=0)
        return guided + (guided - unguided) * self.GUIDANCE_SCALE

    def block_distances(self, frames: int, valid: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The DiT's block distances `[2, heads, T, T]` (`_create_block_diff`), frames from `valid` on kept apart as
        padding: a padded frame sees only padding, so its rows stay finite, and a real frame never sees it."""
        index = torch.arange(frames, device=device)
        blocks = index // self._dit.block_size
        distance = blocks[None, :] - blocks[:, None]
        if valid is not None:
            real = index < valid
            apart = real[:, None] != real[None, :]
            distance = torch.where(real[:, None] | apart, distance, 0)
            distance = torch.where(apart, self.OUT_OF_REACH, distance)
        return distance.expand(2, self._dit.num_attention_heads, frames, frames)

    def _integrate(
        self, noise: torch.Tensor, codes: torch.Tensor, voice: Voice, valid: torch.Tensor | None
    ) -> torch.Tensor:
        block_diff = self.block_distances(noise.shape[1], valid, noise.device)

        def velocity(time: float, state: torch.Tensor) -> torch.Tensor:
            return self.velocity(state, codes, voice, time, block_diff)

        trajectory = RungeKutta4ODESolver(function=velocity, initial_value=noise.float()).integrate(self._times)
        return trajectory[-1].permute(0, 2, 1)

    def _capture(
        self, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]:
        buffers = tuple(value.clone() for value in inputs)
        noise, codes, speaker, reference, valid = buffers

        def integrate() -> torch.Tensor:
            return self._integrate(noise, codes, Voice(speaker, reference), valid)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            integrate()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = integrate()
        log.info("%s: captured the DiT integration for %d mel frames", ENGINE_NAME, noise.shape[1])
        return graph, buffers, output


class ChunkBounds(NamedTuple):
    """One chunk of the schedule in mel frames: it keeps [start, end), and its DiT run waits for `look_ahead` more."""

    start: int
    end: int
    look_ahead: int

    @property
    def window_start(self) -> int:
        """The DiT window reaches back 48 mel of past context, or to the utterance's start."""
        return max(self.start - Token2WavStream.PAST_MEL, 0)

    @property
    def window(self) -> int:
        """The DiT window length (mel) of this chunk when it is not the utterance's last."""
        return self.end + self.look_ahead - self.window_start


class Token2WavStream:
    """Codec codes in, 24 kHz PCM out, chunk by chunk, in the official Qwen2.5-Omni streaming schedule.

    Codes are 50 Hz and the DiT works on 100 Hz mel (2 mel per code); BigVGAN makes 240 samples per mel. Chunk i
    keeps mel [b_i, b_i+1): the DiT sees that span plus 48 mel of past and 24 of look-ahead, starting from the same
    slice of one noise tensor drawn for the whole utterance, so overlapping windows agree. BigVGAN runs on the last
    40 mel of the previous chunk plus the new ones and the 20 mel at each edge are dropped (the edges of a
    convolution stack are wrong), except at the very start and end. Every code thus yields exactly 480 samples.

    Chunk sizes (see `schedule`): a first chunk of `first_chunk_codes` (trade-off: below 48 codes it loses look-ahead,
    none at all up to 36 codes, so its last DiT block sees no future), then the kept sizes of `chunk_ramp_mel`, then
    the official 72 mel. Ramp chunks keep the full past and look-ahead, so they cost no context, only DiT runs: a
    small first chunk plays out sooner than 72 mel take to arrive, and the ramp bridges that (see `simulate_playout`).
    """

    MEL_PER_CODE = 2
    MEL_PER_SECOND = 100
    CHUNK_MEL = 72
    PAST_MEL = 48
    FUTURE_MEL = 24
    OVERLAP_MEL = 20
    BLOCK_MEL = 24  # the DiT's attention block: ramp chunks keep whole blocks, so the look-ahead stays one block
    MIN_FIRST_CHUNK_CODES = OVERLAP_MEL  # the first chunk must outlast the BigVGAN overlap it loses at its end

    def __init__(
        self,
        token2wav: torch.nn.Module,
        solver: DitSolver,
        *,
        voice: Voice,
        max_codes: int,
        generator: torch.Generator,
        first_chunk_codes: int = 48,
        chunk_ramp_mel: Sequence[int] = (),
    ) -> None:
        self._schedule = self.schedule(first_chunk_codes, chunk_ramp_mel)
        self._bounds = next(self._schedule)  # the chunk being waited for
        self._solver = solver
        self._bigvgan = token2wav.code2wav_bigvgan_model
        self._device = voice.speaker.device
        self._voice = voice
        self.samples_per_mel = int(np.prod(self._bigvgan.config.upsample_rates))
        mel_dim = token2wav.code2wav_dit_model.mel_dim
        self.noise = torch.randn(
            1, max_codes * self.MEL_PER_CODE, mel_dim, generator=generator, device=generator.device
        ).to(self._device)
        self._codes: list[int] = []
        self._previous_mel: torch.Tensor | None = None
        self._held_back = torch.zeros(0)  # the last chunk's right BigVGAN edge, voiced by the next chunk

    @property
    def codes(self) -> int:
        return len(self._codes)

    def push(self, code: int) -> list[np.ndarray]:
        """Add one code; returns the PCM of every chunk that became ready (usually none)."""
        self._codes.append(code)
        ready = []
        while len(self._codes) * self.MEL_PER_CODE >= self._bounds.end + self._bounds.look_ahead:
            ready.append(self._chunk(final=False))
        return ready

    def flush(self) -> list[np.ndarray]:
        """The rest of the utterance (end of speech)."""
        if len(self._codes) * self.MEL_PER_CODE > self._bounds.start:
            return [self._chunk(final=True)]
        # A first chunk without look-ahead can end exactly at the last code: no new mel, only its held-back edge,
        # which is the utterance's end, so it is voiced as BigVGAN made it.
        held_back, self._held_back = self._held_back, self._held_back[:0]
        return [held_back.float().cpu().numpy()] if held_back.numel() else []

    def denoise(self, noise: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Mel `[1, 80, T]` for a noise slice and its codes, with this utterance's speaker."""
        return self._solver.solve(noise, codes, self._voice)

    @classmethod
    def check_schedule(cls, first_chunk_codes: int, chunk_ramp_mel: Sequence[int] = ()) -> None:
        """Raises ValueError for a schedule that would break the 480-samples-per-code join or the look-ahead block."""
        if first_chunk_codes < cls.MIN_FIRST_CHUNK_CODES:
            raise ValueError(f"first_chunk_codes must be >= {cls.MIN_FIRST_CHUNK_CODES}, got {first_chunk_codes}")
        for size in chunk_ramp_mel:
            if not 0 < size <= cls.CHUNK_MEL or size % cls.BLOCK_MEL:
                raise ValueError(
                    f"chunk_ramp_mel sizes must be multiples of {cls.BLOCK_MEL} up to {cls.CHUNK_MEL}, got {size}"
                )

    @classmethod
    def schedule(cls, first_chunk_codes: int, chunk_ramp_mel: Sequence[int] = ()) -> Iterator[ChunkBounds]:
        """Every chunk of an endless utterance, in order: the first, the ramp's, then 72-mel chunks.

        The first chunk waits for `first_chunk_codes` codes and gives up look-ahead to fit in them (the official
        rule: 72 mel kept, then the rest up to 24 is look-ahead); every later chunk keeps its full 24 of look-ahead.
        """
        cls.check_schedule(first_chunk_codes, chunk_ramp_mel)
        first_mel = first_chunk_codes * cls.MEL_PER_CODE
        look_ahead = min(cls.FUTURE_MEL, max(0, first_mel - cls.CHUNK_MEL))
        first = ChunkBounds(0, first_mel - look_ahead, look_ahead)
        sizes = itertools.chain(chunk_ramp_mel, itertools.repeat(cls.CHUNK_MEL))
        ends = itertools.accumulate(sizes, initial=first.end)
        later = (ChunkBounds(start, end, cls.FUTURE_MEL) for start, end in itertools.pairwise(ends))
        return itertools.chain((first,), later)

    @classmethod
    def regular_windows(cls, first_chunk_codes: int, chunk_ramp_mel: Sequence[int] = ()) -> tuple[int, ...]:
        """The DiT window lengths (mel) of every chunk but an utterance's last: the ones worth a CUDA graph.

        From chunk len(ramp) + 2 on (the second 72-mel chunk, which starts past 48 mel) every window is the steady one.
        """
        chunks = itertools.islice(cls.schedule(first_chunk_codes, chunk_ramp_mel), len(chunk_ramp_mel) + 3)
        return tuple(sorted({bounds.window for bounds in chunks}))

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        return self._bigvgan(mel.float()).reshape(-1)

    def _chunk(self, *, final: bool) -> np.ndarray:
        bounds = self._bounds
        total = len(self._codes) * self.MEL_PER_CODE
        end = total if final else bounds.end
        window_start = bounds.window_start
        window_end = total if final else end + bounds.look_ahead
        codes = torch.tensor([self._codes[window_start // 2 : window_end // 2]], device=self._device)
        mel = self.denoise(self.noise[:, window_start:window_end], codes)
        kept = mel[:, :, bounds.start - window_start : end - window_start]
        if self._previous_mel is not None:
            kept = torch.cat([self._previous_mel[:, :, -2 * self.OVERLAP_MEL :], kept], dim=2)
        wav = self.vocode(kept)
        edge = self.OVERLAP_MEL * self.samples_per_mel
        first = 0 if self._previous_mel is None else edge
        last = wav.shape[0] if final else wav.shape[0] - edge
        self._previous_mel = kept
        self._held_back = wav[last:]
        self._bounds = bounds._replace(start=end) if final else next(self._schedule)
        return wav[first:last].float().cpu().numpy()


class PlannedChunk(NamedTuple):
    """A chunk as playout sees it: it can run once `codes` codes exist, denoises a DiT window of `window` mel (0: no
    vocoder run, only a held-back edge) and adds `mel` frames of audio."""

    codes: int
    window: int
    mel: int


def plan_chunks(
    total_codes: int, first_chunk_codes: int = 48, chunk_ramp_mel: Sequence[int] = ()
) -> list[PlannedChunk]:
    """The chunks `Token2WavStream` emits for an utterance of `total_codes` codes, the last one at `flush()`."""
    total = total_codes * Token2WavStream.MEL_PER_CODE
    planned: list[PlannedChunk] = []
    voiced = 0
    schedule = Token2WavStream.schedule(first_chunk_codes, chunk_ramp_mel)
    bounds = next(schedule)
    while bounds.end + bounds.look_ahead <= total:
        mel = bounds.end - Token2WavStream.OVERLAP_MEL - voiced
        codes = (bounds.end + bounds.look_ahead) // Token2WavStream.MEL_PER_CODE
        planned.append(PlannedChunk(codes, bounds.window, mel))
        voiced += mel
        bounds = next(schedule)
    if total > bounds.start:
        planned.append(PlannedChunk(total_codes, total - bounds.window_start, total - voiced))
    elif total > voiced:
        planned.append(PlannedChunk(total_codes, 0, total - voiced))
    return planned


RECOMMENDED_FIRST_CHUNK_CODES = 24
RECOMMENDED_CHUNK_RAMP_MEL = (24, 24, 48)
"""First audio after 24 codes with no gap at RTF <= 0.45 and 56-ms vocoder chunks (see `simulate_playout`)."""
_ROUNDING_SECONDS = 1e-9  # float error in summed times; far below one sample (42 µs)


class Playout(NamedTuple):
    """When speech starts and where it stalls, in seconds (the first code's generation starts at `start_seconds`)."""

    first_audio: float
    gaps: tuple[tuple[float, float], ...]  # (time playback ran dry, seconds of silence until the next chunk)


def simulate_playout(
    chunks: Sequence[PlannedChunk], code_seconds: float, vocoder_seconds: float, *, start_seconds: float = 0.0
) -> Playout:
    """Plays `chunks` out as they are made, to tell whether a schedule is gap-free at a measured speed.

    The model is the engine's decode loop: codes come one after another at `code_seconds` each (real-time factor
    RTF = code_seconds / 0.02 s), and a chunk's DiT + BigVGAN run (`vocoder_seconds`, whatever its window) holds up
    the next code, as the vocoder runs inline on the same GPU. Each chunk plays as soon as it is made and the one
    before it has finished; `start_seconds` (e.g. the prefill) shifts every time. The end-of-speech code is not
    counted.

    Recommended for the H100 figures of the GPU baseline (thinker + talker in CUDA graphs, DiT bf16 at 5 steps in a
    graph, about 56 ms per chunk): `RECOMMENDED_FIRST_CHUNK_CODES` = 24 with `RECOMMENDED_CHUNK_RAMP_MEL` =
    (24, 24, 48). The first chunk plays 0.28 s; the second keeps 24 mel and needs 24 more codes (its end plus 24 of
    look-ahead), so at RTF 0.45 it is out after 216 + 56 = 272 ms; each later chunk of k mel needs k/2 more codes,
    and the sizes grow only as fast as the buffered audio allows. This simulator finds no gap for any length up to
    500 codes while 24 codes plus one chunk fit in 0.28 s: up to 9.3 ms per code (RTF 0.47) with 56-ms chunks, or up
    to 64 ms per chunk at RTF 0.45 (so an eager BigVGAN, DiT 51 + 30 ms, stalls once for 17 ms). Without the ramp a
    24-code first chunk stalls at 0.28 s of speech for 64 ms at RTF 0.3 and 208 ms at RTF 0.45; the official 48-code
    schedule has no gap but speaks 144-216 ms later. Cost: two DiT runs more than the official schedule in the first
    1.44 s (4 chunks instead of 2); from there on the chunk boundaries are the official ones.
    """
    if not chunks:
        raise ValueError("no chunks to play")
    clock = start_seconds
    made = 0
    first_audio = played_until = math.nan
    gaps: list[tuple[float, float]] = []
    for index, chunk in enumerate(chunks):
        clock += (chunk.codes - made) * code_seconds + (vocoder_seconds if chunk.window else 0.0)
        made = chunk.codes
        if index == 0:
            first_audio = played_until = clock
        elif clock > played_until + _ROUNDING_SECONDS:
            gaps.append((played_until, clock - played_until))
            played_until = clock
        played_until += chunk.mel / Token2WavStream.MEL_PER_SECOND
    return Playout(first_audio, tuple(gaps))
