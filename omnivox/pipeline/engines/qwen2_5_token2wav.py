"""Qwen2.5-Omni's token2wav (flow-matching DiT + BigVGAN) as a stream: codec codes in, 24 kHz PCM out per chunk.

transformers runs token2wav on the whole utterance only; this module re-implements the official streaming schedule
so speech can start while the talker is still writing codes.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

log = logging.getLogger(__name__)

ENGINE_NAME = "qwen2.5-omni"


class DitSolver:
    """The DiT's flow-matching ODE from a caller-given noise window (`DiT.sample()` draws its own noise).

    RK4 over `steps` time points with the sway schedule and classifier-free guidance 0.5, as `DiT.sample()`. The ODE
    state stays float32 whatever the DiT's dtype. Time points are Python floats, so an integration never waits for
    the device and can be captured: with `graphs`, the windows of `graph_lengths` mel (the schedule's regular
    windows) are each captured once as one CUDA graph and replayed; other lengths (the last chunk) run eagerly.
    """

    GUIDANCE_SCALE = 0.5
    SWAY_COEFFICIENT = -1.0

    def __init__(
        self, dit: torch.nn.Module, *, steps: int, graphs: bool = False, graph_lengths: tuple[int, ...] = ()
    ) -> None:
        self._dit = dit
        self.dtype = next(dit.parameters()).dtype
        uniform = [index / (steps - 1) for index in range(steps)]
        self._times = [t + self.SWAY_COEFFICIENT * (math.cos(math.pi / 2 * t) - 1 + t) for t in uniform]
        self._graphs = graphs
        self._graph_lengths = set(graph_lengths)
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def solve(
        self, noise: torch.Tensor, codes: torch.Tensor, conditioning: torch.Tensor, reference_mel: torch.Tensor
    ) -> torch.Tensor:
        """noise `[1, T, mel]` float32, codes `[1, T/2]`, speaker conditioning `[1, C]`, reference mel `[1, R, mel]`
        -> mel `[1, mel, T]` float32."""
        if not self._graphs or noise.shape[1] not in self._graph_lengths:
            return self._integrate(noise, codes, conditioning, reference_mel)
        key = (noise.shape[1], reference_mel.shape[1])
        if key not in self._captured:
            self._captured[key] = self._capture(noise, codes, conditioning, reference_mel)
        graph, buffers, output = self._captured[key]
        for buffer, value in zip(buffers, (noise, codes, conditioning, reference_mel), strict=True):
            buffer.copy_(value)
        graph.replay()
        return output.clone()

    def _integrate(
        self, noise: torch.Tensor, codes: torch.Tensor, conditioning: torch.Tensor, reference_mel: torch.Tensor
    ) -> torch.Tensor:
        speaker = conditioning.to(self.dtype).unsqueeze(1).repeat(1, noise.shape[1], 1)
        reference = reference_mel.to(self.dtype)

        def velocity(time: float, state: torch.Tensor) -> torch.Tensor:
            output = self._dit(
                hidden_states=state.to(self.dtype),
                quantized_code=codes,
                speaker_embedding=speaker,
                condition_vector=reference,
                time_step=torch.full((), time, device=state.device, dtype=self.dtype),
                apply_cfg=True,
            ).float()
            guided, unguided = torch.chunk(output, 2, dim=0)
            return guided + (guided - unguided) * self.GUIDANCE_SCALE

        trajectory = RungeKutta4ODESolver(function=velocity, initial_value=noise.float()).integrate(self._times)
        return trajectory[-1].permute(0, 2, 1)

    def _capture(
        self, noise: torch.Tensor, codes: torch.Tensor, conditioning: torch.Tensor, reference_mel: torch.Tensor
    ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]:
        buffers = tuple(value.clone() for value in (noise, codes, conditioning, reference_mel))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._integrate(*buffers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self._integrate(*buffers)
        log.info("%s: captured the DiT integration for %d mel frames", ENGINE_NAME, noise.shape[1])
        return graph, buffers, output


class Token2WavStream:
    """Codec codes in, 24 kHz PCM out, chunk by chunk, in the official Qwen2.5-Omni streaming schedule.

    Codes are 50 Hz and the DiT works on 100 Hz mel (2 mel per code); BigVGAN makes 240 samples per mel. Chunk i
    keeps mel [b_i, b_i+1): the DiT sees that span plus 48 mel of past and 24 of look-ahead, starting from the same
    slice of one noise tensor drawn for the whole utterance, so overlapping windows agree. BigVGAN runs on the last
    40 mel of the previous chunk plus the new ones and the 20 mel at each edge are dropped (the edges of a
    convolution stack are wrong), except at the very start and end. Every code thus yields exactly 480 samples.
    """

    MEL_PER_CODE = 2
    CHUNK_MEL = 72
    PAST_MEL = 48
    FUTURE_MEL = 24
    OVERLAP_MEL = 20
    MIN_FIRST_CHUNK_CODES = OVERLAP_MEL  # the first chunk must outlast the BigVGAN overlap it loses at its end

    def __init__(
        self,
        token2wav: torch.nn.Module,
        solver: DitSolver,
        *,
        conditioning: torch.Tensor,
        reference_mel: torch.Tensor,
        max_codes: int,
        generator: torch.Generator,
        first_chunk_codes: int = 48,
    ) -> None:
        self._solver = solver
        self._bigvgan = token2wav.code2wav_bigvgan_model
        self._device = conditioning.device
        self._conditioning = conditioning
        self._reference_mel = reference_mel
        self.samples_per_mel = int(np.prod(self._bigvgan.config.upsample_rates))
        mel_dim = token2wav.code2wav_dit_model.mel_dim
        self.noise = torch.randn(
            1, max_codes * self.MEL_PER_CODE, mel_dim, generator=generator, device=generator.device
        ).to(self._device)
        first_mel = first_chunk_codes * self.MEL_PER_CODE
        self._first_look_ahead = min(self.FUTURE_MEL, max(0, first_mel - self.CHUNK_MEL))
        self._next_end = first_mel - self._first_look_ahead  # end (exclusive) of the chunk being waited for
        self._start = 0  # start of that chunk
        self._chunks = 0
        self._codes: list[int] = []
        self._previous_mel: torch.Tensor | None = None

    @property
    def codes(self) -> int:
        return len(self._codes)

    def push(self, code: int) -> list[np.ndarray]:
        """Add one code; returns the PCM of every chunk that became ready (usually none)."""
        self._codes.append(code)
        ready = []
        while len(self._codes) * self.MEL_PER_CODE >= self._next_end + self._look_ahead():
            ready.append(self._chunk(final=False))
        return ready

    def flush(self) -> list[np.ndarray]:
        """The rest of the utterance (end of speech)."""
        if len(self._codes) * self.MEL_PER_CODE <= self._start:
            return []
        return [self._chunk(final=True)]

    def denoise(self, noise: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Mel `[1, 80, T]` for a noise slice and its codes, with this utterance's speaker."""
        return self._solver.solve(noise, codes, self._conditioning, self._reference_mel)

    @staticmethod
    def regular_windows(first_chunk_codes: int) -> tuple[int, ...]:
        """The DiT window lengths (mel) of the first and of the steady chunks: the ones worth a CUDA graph."""
        first_mel = first_chunk_codes * Token2WavStream.MEL_PER_CODE
        first_end = first_mel - min(Token2WavStream.FUTURE_MEL, max(0, first_mel - Token2WavStream.CHUNK_MEL))
        second = min(first_end, Token2WavStream.PAST_MEL) + Token2WavStream.CHUNK_MEL + Token2WavStream.FUTURE_MEL
        steady = Token2WavStream.PAST_MEL + Token2WavStream.CHUNK_MEL + Token2WavStream.FUTURE_MEL
        return tuple(sorted({first_mel, second, steady}))

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        return self._bigvgan(mel.float()).reshape(-1)

    def _look_ahead(self) -> int:
        return self._first_look_ahead if self._chunks == 0 else self.FUTURE_MEL

    def _chunk(self, *, final: bool) -> np.ndarray:
        total = len(self._codes) * self.MEL_PER_CODE
        end = total if final else self._next_end
        window_start = max(self._start - self.PAST_MEL, 0)
        window_end = total if final else end + self._look_ahead()
        codes = torch.tensor([self._codes[window_start // 2 : window_end // 2]], device=self._device)
        mel = self.denoise(self.noise[:, window_start:window_end], codes)
        kept = mel[:, :, self._start - window_start : end - window_start]
        if self._previous_mel is not None:
            kept = torch.cat([self._previous_mel[:, :, -2 * self.OVERLAP_MEL :], kept], dim=2)
        wav = self.vocode(kept)
        edge = self.OVERLAP_MEL * self.samples_per_mel
        first = 0 if self._previous_mel is None else edge
        last = wav.shape[0] if final else wav.shape[0] - edge
        self._previous_mel = kept
        self._chunks += 1
        self._start, self._next_end = end, end + self.CHUNK_MEL
        return wav[first:last].float().cpu().numpy()
