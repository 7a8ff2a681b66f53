"""Qwen3-Omni engine: speech out from the first codec frame.

transformers' `generate()` runs the thinker to the end, then the talker, then code2wav, so nothing is heard until
the whole answer exists (9.1 s for a 5 s answer at full size on an H200). This engine drives the same modules step
by step instead:

* the thinker decodes one text token per step and its text is streamed at once;
* the talker needs only the *embedding* of thinker token k+1 for its step k, so it runs in lock-step one token
  behind the thinker; each talker step yields one complete 16-code frame (the code predictor is called here, not
  hidden inside the next step's input preparation as in `generate()`);
* the causal code2wav turns new frames into PCM every few frames, with left context and a global sample cursor.

The code predictor (15 small decode steps per frame, the largest cost of a talker step) runs batched over every
active session in one call (`step_generations`); its inputs have the same shape for every session. With the
`static_cache` switch the thinker and talker steps of all sessions also run as one batch each, on shared KV slots
(`slots.py`), which can be replayed as CUDA graphs.

Multi-turn: as in the Qwen2.5 engine, a turn that continues the conversation's stored prompt encodes only its new
part (`prefix_cache.py`); the stored prompt keeps the two thinker layers the talker prompt reads as well.
Rope offsets are kept per generation and positions are passed explicitly, because the model classes store them on
the module and interleaved sessions would overwrite each other's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import Cache, PreTrainedTokenizerBase, Qwen3OmniMoeForConditionalGeneration
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

from omnivox.pipeline.engines.base import AudioDelta, Delta, EngineError, ResponseRequest, Usage
from omnivox.pipeline.engines.prefix_cache import Prefix, keep_prompt
from omnivox.pipeline.engines.qwen_common import (
    AnswerText,
    EngineOptions,
    ImageFormat,
    ModelInputs,
    PromptBuilder,
    PromptFormat,
    QwenOmniEngine,
    Sampling,
    TokenSampler,
    load_pretrained,
    load_tokenizer,
    make_generator,
    options_from_mapping,
    resolve_speaker,
    sampling_probabilities,
    text_position,
)
from omnivox.pipeline.engines.scheduler import StepBatch
from omnivox.pipeline.engines.slots import Decoder, GrowingCaches, SlotPool, SlotSeats
from omnivox.pipeline.engines.stepping import Call, StepPlan, only_result, run_steps

log = logging.getLogger(__name__)

ENGINE_NAME = "qwen3-omni"
DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
VOICES = ("Ethan", "Chelsie", "Aiden")
TEXT_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
SUPPRESSED_CODEC_TAIL = 1024
"""`generate()` forbids the last 1024 talker ids (special codec tokens) except codec EOS."""


def qwen3_audio_tokens(feature_frames: int) -> int:
    """Qwen3-Omni's audio encoder makes 13 tokens per 100 feature frames (12.5 Hz), as its processor counts them."""
    return int(_get_feat_extract_output_lengths(torch.tensor(feature_frames)))


def prompt_format(vision_config: Any) -> PromptFormat:
    """Qwen3-Omni's placeholders; images are cut with the checkpoint's patch geometry and the Qwen3-VL image
    normalisation (mean = std = 0.5 per channel, as Qwen3-VL's processor does: check a checkpoint's
    `preprocessor_config.json` before relying on image answers)."""
    return PromptFormat(
        audio_start="<|audio_start|>",
        audio_placeholder="<|audio_pad|>",
        audio_end="<|audio_end|>",
        audio_tokens=qwen3_audio_tokens,
        audio_zero_padded=False,
        image=ImageFormat(
            start="<|vision_start|>",
            placeholder="<|image_pad|>",
            end="<|vision_end|>",
            patch_size=vision_config.patch_size,
            temporal_patch_size=vision_config.temporal_patch_size,
            merge_size=vision_config.spatial_merge_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
    )


@dataclass(frozen=True)
class Qwen3OmniOptions(EngineOptions):
    """The `engine.options` of `qwen3-omni` in the YAML config (with the shared ones of `EngineOptions`); every field
    is one documented switch. A decode slot (`static_cache`) of the 30B-A3B holds about 0.1 MB per token in bf16;
    a batched MoE step reads the routed experts once for the whole batch."""

    experts_implementation: str | None = None
    """MoE expert kernel; None keeps transformers' default "grouped_mm" (3.4x faster prefill than "eager" on an
    H200), or "eager", "batched_mm". grouped_mm needs torch >= 2.9 on an SM80+ GPU (torch 2.8: Hopper only);
    elsewhere transformers falls back to a per-expert loop that waits on the host in every MoE layer, which is
    refused at start-up. "eager" cannot be captured in a CUDA graph (`cuda_graphs` with `static_cache`)."""
    voice: str = "Ethan"
    """Speaker for requests whose voice maps to no speaker of the model (Ethan, Chelsie or Aiden)."""
    system_prompt: str = ""
    """The model's system prompt; the caller's instructions are appended to it. Qwen3-Omni speaks without one."""
    max_active: int = 8
    max_queued: int = 32
    batch_sessions: bool = True
    """One step for all active sessions: their code-predictor runs (and, with `static_cache`, their thinker and
    talker steps) go to the GPU as one batch each. False steps the sessions one by one."""
    chunk_frames: int = 4
    """Codec frames (80 ms each) per code2wav window once speech is under way."""
    first_chunk_frames: int = 1
    """Frames in the first window; 1 gives the earliest first audio. Windows then double up to `chunk_frames`."""
    left_context_frames: int | None = None
    """Frames of past codes each code2wav window re-reads. None (the default) is the vocoder's whole receptive field
    (578 frames at full size: 8 transformer layers with a 72-frame window, then the convolutions' 10), so streamed
    audio equals a whole decode; only the transformer reads that far, the convolutions take their 10 frames, so it
    costs little. 25 was the official streaming value: shorter than even one layer's window."""
    max_audio_frames: int = 4096
    """Longest spoken answer in codec frames (80 ms each: 5.5 minutes)."""
    talker_top_k: int = 50
    talker_top_p: float = 1.0
    predictor_top_k: int = 50
    """Code predictor sampling (temperature 1 when the talker samples), as `generate()` does it."""
    predictor_top_p: float = 0.8
    cuda_graphs: bool = False
    """Run each frame's 15 code-predictor passes as one CUDA graph replay, and, with `static_cache`, the thinker
    and talker steps of all slots as one graph each. Every graph is captured at start-up: the predictor's for batch
    sizes 1, 2, 4, ... up to `max_active` (a batch runs in the smallest that holds it, padded), sharing one memory
    pool; if a capture fails the predictor runs eagerly, with the error in the log. Needs attn_implementation sdpa
    or eager (the unrolled predictor passes its own causal mask). Off by default: not yet measured on a GPU."""
    prewarm: bool = True
    """On CUDA, run code2wav at every window length and batch size during `start()`: the first call at a new shape
    picks convolution plans (100-130 ms at full size), which would otherwise land on a listener's first chunks."""
    ignore_eos: bool = False
    """Benchmarks only: ignore text and codec EOS, so every answer runs to `max_tokens` and `max_audio_frames`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_windows(self.chunk_frames, self.first_chunk_frames, self.left_context_frames)
        if self.voice.lower() not in {voice.lower() for voice in VOICES}:
            raise ValueError(f"voice must be one of {VOICES}, got {self.voice!r}")
        if self.max_audio_frames < 1:
            raise ValueError("max_audio_frames must be >= 1")

    @property
    def own_masks(self) -> tuple[str, ...]:
        return (*super().own_masks, *(("cuda_graphs",) if self.cuda_graphs else ()))

    @property
    def talker_sampling(self) -> TalkerSampling:
        return TalkerSampling(
            temperature=self.talker_temperature,
            top_k=self.talker_top_k,
            top_p=self.talker_top_p,
            repetition_penalty=self.talker_repetition_penalty,
            predictor_top_k=self.predictor_top_k,
            predictor_top_p=self.predictor_top_p,
        )


@dataclass(frozen=True)
class TalkerSampling:
    """How codec codes are drawn; the defaults are those of `Qwen3OmniMoeForConditionalGeneration.generate()`.

    A temperature of 0 means greedy decoding for the talker and the code predictor alike.
    """

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    predictor_top_k: int = 50
    predictor_top_p: float = 0.8

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def pick_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator | None] = (None,),
) -> torch.Tensor:
    """One id per row of `[rows, vocab]` logits, as a `[rows]` tensor on their device: greedy at temperature 0.

    Ids stay on the device so that a loop of small steps (the code predictor) never waits for the GPU. Each row
    draws from its own generator, so a seeded request repeats whatever it is batched with.
    """
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probabilities = sampling_probabilities(_filtered_scores(logits, temperature, top_k, top_p))
    return torch.cat(
        [
            torch.multinomial(row, 1, generator=generator)
            for row, generator in zip(probabilities, generators, strict=True)
        ]
    )


def _filtered_scores(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """`[rows, vocab]` logits scaled by the temperature, with what top-k and top-p exclude set to -inf."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        threshold = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < threshold, -float("inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probabilities = torch.softmax(sorted_scores, dim=-1)
        beyond = probabilities.cumsum(-1) - probabilities > top_p  # keeps the token that crosses top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(beyond, -float("inf")))
    return scores


def check_windows(chunk_frames: int, first_chunk_frames: int, left_context_frames: int | None) -> None:
    """Reject window settings that could not stream every sample exactly once."""
    if not 1 <= first_chunk_frames <= chunk_frames:
        raise ValueError(f"need 1 <= first_chunk_frames ({first_chunk_frames}) <= chunk_frames ({chunk_frames})")
    if left_context_frames is not None and left_context_frames < 1:
        raise ValueError("left_context_frames must be >= 1: without context each window's 555-sample tail is lost")


def code2wav_receptive_field(config: Any) -> tuple[int, int]:
    """Frames of past codes that reach a code2wav output sample: (through the transformer, through the convolutions).

    The transformer is causal with a sliding window, so each of its layers reaches `sliding_window - 1` frames
    further back (8 x 71 = 568 at full size). The convolutions after it (two ConvNeXt upsamplers, then the decoder's
    causal convolutions and dilated residual units at ever higher rates) reach about 9.4 frames back; the transposed
    convolutions reach one input sample of their own rate back (and one ahead, which is the tail a window lacks).
    """
    transformer = config.num_hidden_layers * (config.sliding_window - 1)
    rate, reach = 1, 0.0
    for factor in config.upsampling_ratios:  # transposed convolution (kernel = stride), then ConvNeXt (kernel 7)
        rate *= factor
        reach += 6 / rate
    reach += 6 / rate  # the decoder's first causal convolution (kernel 7)
    for factor in config.upsample_rates:  # transposed convolution, then residual units with dilations 1, 3, 9
        reach += 1 / rate
        rate *= factor
        reach += 6 * (1 + 3 + 9) / rate
    reach += 6 / rate  # the output convolution
    return transformer, math.ceil(reach)


class Code2WavWindow(NamedTuple):
    """A code window to decode: `codes` `[1, quantizers, frames]`, of which the convolutions run on the last
    `convolved` frames only (the earlier ones are the transformer's context)."""

    codes: torch.Tensor
    convolved: int


def decode_window(code2wav: torch.nn.Module, codes: torch.Tensor, convolved: int) -> torch.Tensor:
    """`code2wav.forward` on `[batch, quantizers, frames]` codes with the convolution stack run on the last
    `convolved` frames: `[batch, 1, convolved * 1920 - 555]` samples. The transformer reaches hundreds of frames back
    and costs little; the convolutions, which make 1920 samples a frame, reach only a few."""
    hidden = code2wav.code_embedding(codes + code2wav.code_offset).mean(1)
    hidden = code2wav.pre_transformer(inputs_embeds=hidden).last_hidden_state
    hidden = hidden[:, -convolved:].permute(0, 2, 1)
    for blocks in code2wav.upsample:
        for block in blocks:
            hidden = block(hidden)
    for block in code2wav.decoder:
        hidden = block(hidden)
    return hidden.clamp(min=-1, max=1)


class CausalCode2WavStream:
    """Decodes codec frames to 24 kHz PCM as they arrive, with no gap and no repeated sample.

    A code2wav window of n frames yields n*1920 - 555 samples (the causal transposed convolutions drop a tail).
    Each window therefore re-decodes old frames and a global sample cursor says where the new audio starts; the tail
    missing from one window comes with the next. The transformer re-reads `left_context_frames` old frames (by
    default its whole receptive field, so the stream equals a whole decode) and the convolutions only the few they
    reach (`code2wav_receptive_field`). Window sizes ramp up from `first_chunk_frames` (doubling the audio emitted
    so far) to `chunk_frames`, so a 1-frame first chunk does not leave the listener waiting on a full chunk right
    after it.

    The stream hands out code windows (`add`, `rest`) and takes their decoded waveforms back (`audio`), so the
    engine can decode the windows of all sessions in one batched code2wav call.
    """

    def __init__(
        self,
        code2wav: torch.nn.Module,
        *,
        chunk_frames: int,
        first_chunk_frames: int,
        left_context_frames: int | None = None,
    ):
        check_windows(chunk_frames, first_chunk_frames, left_context_frames)
        transformer_reach, convolution_reach = code2wav_receptive_field(code2wav.config)
        self._chunk_frames = chunk_frames
        self._first_chunk_frames = first_chunk_frames
        self._left_context_frames = (
            transformer_reach + convolution_reach if left_context_frames is None else left_context_frames
        )
        self._convolved_context = min(convolution_reach, self._left_context_frames)
        self._samples_per_frame = int(code2wav.total_upsample)
        self._frames: list[torch.Tensor] = []
        self._decoded_frames = 0
        self._window_start_sample = 0
        self.samples_emitted = 0

    @property
    def frames(self) -> int:
        return len(self._frames)

    def _window_frames(self) -> int:
        return min(self._chunk_frames, max(self._first_chunk_frames, self._decoded_frames))

    def add(self, frame: torch.Tensor) -> Code2WavWindow | None:
        """Add one frame of `num_quantizers` codes; returns the window to decode when one is due."""
        self._frames.append(frame)
        if len(self._frames) - self._decoded_frames >= self._window_frames():
            return self._window()
        return None

    def rest(self) -> Code2WavWindow | None:
        """The window of whatever frames are still pending (end of speech)."""
        return self._window() if len(self._frames) > self._decoded_frames else None

    def audio(self, wav: torch.Tensor) -> np.ndarray:
        """The new samples of the last window handed out, from its decoded waveform."""
        wav = wav.reshape(-1)
        new = wav[self.samples_emitted - self._window_start_sample :]
        self.samples_emitted = self._window_start_sample + wav.shape[0]
        return new.float().cpu().numpy()

    def _window(self) -> Code2WavWindow:
        start = max(0, self._decoded_frames - self._left_context_frames)
        convolved_start = max(0, self._decoded_frames - self._convolved_context)
        self._window_start_sample = convolved_start * self._samples_per_frame
        self._decoded_frames = len(self._frames)
        codes = torch.stack(self._frames[start:], dim=-1).unsqueeze(0)
        return Code2WavWindow(codes, self._decoded_frames - convolved_start)


def prewarm_code2wav(code2wav: torch.nn.Module, longest_convolved: int, largest_batch: int) -> None:
    """Run code2wav's convolutions once at every length the stream can give them, for every batch of sessions.

    On CUDA the first call at a new input shape picks convolution plans (100-130 ms at full size, measured), which
    would otherwise land on a listener's first chunks. (The transformer has no such cost, whatever its length.)
    """
    quantizers = code2wav.config.num_quantizers
    device = next(code2wav.parameters()).device
    with torch.inference_mode():
        for frames in range(1, longest_convolved + 1):
            for batch in range(1, largest_batch + 1):
                decode_window(code2wav, torch.zeros(batch, quantizers, frames, dtype=torch.long, device=device), frames)


# ---------------------------------------------------------------------------------------------- decode steps
DECODE_ORDER = ("thinker", "talker", "predictor", "code2wav")
"""Within one step: the thinker's token is the talker's text input, the talker's state feeds the predictor, whose
frame may complete a code2wav window."""


class Code2WavBatcher:
    """Answers "code2wav" calls: the due code windows of all sessions decoded together, one batched call per
    window shape (steady windows all have the same)."""

    def __init__(self, code2wav: torch.nn.Module) -> None:
        self._code2wav = code2wav

    def run(self, part: str, calls: list[Any]) -> list[Any]:
        answers: list[Any] = [None] * len(calls)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, window in enumerate(calls):
            by_shape.setdefault((window.codes.shape[-1], window.convolved), []).append(index)
        for (_, convolved), indices in by_shape.items():
            codes = torch.cat([calls[index].codes for index in indices])
            wavs = decode_window(self._code2wav, codes, convolved)
            for row, index in enumerate(indices):
                answers[index] = wavs[row]
        return answers


class EagerDecoder(GrowingCaches):
    """Qwen3's decode steps on one request's growing caches."""

    def __init__(self, model: Qwen3OmniMoeForConditionalGeneration) -> None:
        super().__init__()
        self._model = model
        self._device = next(model.thinker.parameters()).device

    def thinker_step(self, token: int) -> torch.Tensor:
        """Feed one text token: next-token logits `[1, vocab]`."""
        assert self.thinker_cache is not None
        past = self.thinker_cache.get_seq_length()
        output = self._model.thinker(
            input_ids=torch.tensor([[token]], device=self._device),
            position_ids=text_position(past + self.thinker_rope_delta, self._device),
            past_key_values=self.thinker_cache,
            use_cache=True,
        )
        return output.logits[:, -1]

    def talker_step(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one talker input `[1, 1, hidden]`: (its last hidden state `[1, 1, hidden]`, codebook-0 logits)."""
        assert self.talker_cache is not None
        past = self.talker_cache.get_seq_length()
        talker = self._model.talker
        hidden = talker.model(
            inputs_embeds=embeds,
            position_ids=text_position(past + self.talker_rope_delta, self._device),
            past_key_values=self.talker_cache,
            use_cache=True,
        ).last_hidden_state[:, -1:]
        return hidden, talker.codec_head(hidden[:, -1]).float()


class Qwen3SlotPool(SlotPool):
    """Qwen3's decode slots: the thinker and talker steps of every session at once."""

    def run(self, part: str, calls: list[Any]) -> list[Any]:
        if part == "thinker":
            logits = self.thinker_step(calls)[2]
            return [logits[row : row + 1] for row in range(len(calls))]
        hidden = self.talker.step([args[0] for args in calls], torch.cat([args[1] for args in calls]))
        logits = self.codec_head(hidden).float()
        return [(hidden[row : row + 1, None], logits[row : row + 1]) for row in range(len(calls))]


# ---------------------------------------------------------------------------------------------- one request
@dataclass(frozen=True)
class TurnPlan:
    """Everything decided per request before the GPU sees it."""

    inputs: ModelInputs
    speaker_id: int
    text_sampling: Sampling
    max_text_tokens: int
    output_audio: bool
    seed: int | None
    request_id: str = ""
    conversation_id: str = ""
    stop: tuple[str, ...] = ()
    tools: bool = False
    """The request offers tools: the answer's text is split into speech and function calls."""
    forced_ids: tuple[int, ...] = ()
    """Tokens the answer begins with (a `required` or named tool choice)."""
    suppressed_ids: tuple[int, ...] = ()
    """Tokens the answer never holds (the call token under tool choice `none`)."""


@dataclass(frozen=True)
class FrameRequest:
    """A talker step waiting for its 15 residual codes: the talker's last hidden state and codebook-0 id."""

    hidden: torch.Tensor
    first_code: torch.Tensor


class Qwen3Generation:
    """One request: thinker, talker and code2wav advanced together, one text token and one codec frame per step.

    Step 0 runs both prefills and already yields the first codec frame (the talker's first step needs only the
    first text token, so no thinker decode step stands before the first audio). Step n >= 1 feeds thinker token
    n-1 (producing token n), then runs talker step n, whose text input is token n: the thinker stays exactly one
    token ahead. The final text token (EOS, or the one that hits the length limit) is never spoken, as in
    `generate()`: its slot carries `tts_eos`, and `tts_pad` follows for ever.

    A step is a `StepPlan` that yields its thinker, talker and code-predictor calls, so `step_generations` runs
    each of them once for all sessions.
    """

    def __init__(self, engine: Qwen3OmniEngine, plan: TurnPlan) -> None:
        self._engine = engine
        self._model = engine.model
        self._config = engine.model.config
        self._options = engine.options
        self._plan = plan
        self._device = engine.runtime.device
        self._dtype = engine.runtime.dtype
        self._eos_ids = frozenset() if engine.options.ignore_eos else engine.text_eos_ids
        self.generator, seed = make_generator(plan.seed, self._device)
        log.debug("%s: request %s seed %d", ENGINE_NAME, plan.request_id, seed)
        self._text = AnswerText(engine.tokenizer, plan.stop, tools=plan.tools)
        self._text_sampler = TokenSampler(
            plan.text_sampling, self.generator, suppress_ids=plan.suppressed_ids, forced=plan.forced_ids
        )
        self._text_history: list[int] = plan.inputs.input_ids[0].tolist()
        self._audio = plan.output_audio and engine.audio_enabled
        self.talker_sampling = engine.options.talker_sampling
        self.text_ids: list[int] = []
        self.frames: list[torch.Tensor] = []
        self._started = False
        self._finished = False
        self._decoder: Decoder | None = None
        self._prompt: Prefix | None = None
        """The encoded prompt, stored for the conversation's next turn when this request ends."""
        self._cached_tokens = 0
        self.decoding = ""
        """"static" (shared batched slots) or "eager" (growing caches), once the prefill has run."""
        self._thinker_done = False
        self._talker_logits: torch.Tensor | None = None
        self._codec_bias: torch.Tensor | None = None
        self._codes_seen: torch.Tensor | None = None
        self._last_frame_embedding: torch.Tensor | None = None
        self._trailing_text: list[torch.Tensor] = []
        self._tts_eos: torch.Tensor | None = None
        self._tts_pad: torch.Tensor | None = None
        self._talker_done = not self._audio
        self._speech_closed = False
        """The talker's text has ended (the answer's end, or the start of a function call)."""
        self._vocoder: CausalCode2WavStream | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def close(self) -> None:
        """Drop every cache and tensor of this request so its memory (or its slots) can be reused at once; the
        encoded prompt goes back to the conversation's store for its next turn."""
        if self._decoder is not None:
            self._decoder.release()
            self._decoder = None
        if self._prompt is not None:
            keep_prompt(self._engine.prefixes, self._plan.conversation_id, self._prompt)
            self._prompt = None
        self._talker_logits = self._last_frame_embedding = None
        self._codec_bias = self._codes_seen = None
        self._trailing_text = []
        self._vocoder = None
        self._finished = True

    def step(self) -> list[Delta]:
        """One step of this generation alone."""
        return only_result(step_generations([self]))

    def plan_step(self) -> StepPlan:
        deltas: list[Delta] = []
        if not self._started:
            self._started = True
            request = self._prefill(deltas)
        else:
            request = yield from self._advance(deltas)
        if request is not None:
            frame, embedding_sum = yield Call(self._engine.code_predictor, "predictor", (request, self.generator))
            yield from self._voice_frame(frame, embedding_sum, deltas)
        return deltas

    def _advance(self, deltas: list[Delta]) -> Generator[Call, Any, FrameRequest | None]:
        assert self._decoder is not None
        if not self._thinker_done:
            logits = yield self._decoder.call("thinker", self.text_ids[-1])
            self._accept_text(self._text_sampler(logits, self._history_tensor()), deltas)
        if self._talker_done:
            self._finish_if_done(deltas)
            return None
        if len(self.frames) >= self._options.max_audio_frames:
            yield from self._end_speech(deltas)
            return None
        step = len(self.frames) - 1
        text = self._trailing_text[step] if step < len(self._trailing_text) else self._tts_pad
        hidden, self._talker_logits = yield self._decoder.call("talker", self._last_frame_embedding + text)
        return FrameRequest(hidden, self._pick_first_code())

    def _voice_frame(
        self, frame: torch.Tensor, embedding_sum: torch.Tensor, deltas: list[Delta]
    ) -> Generator[Call, Any, None]:
        """Voice the completed 16-code `frame`, or end the speech at codec EOS."""
        if int(frame[0]) == self._config.talker_config.codec_eos_token_id:
            yield from self._end_speech(deltas)
            return
        self._last_frame_embedding = embedding_sum
        self._codes_seen.index_fill_(-1, frame[:1], True)
        self.frames.append(frame)
        if self._vocoder is None:
            self._vocoder = CausalCode2WavStream(
                self._model.code2wav,
                chunk_frames=self._options.chunk_frames,
                first_chunk_frames=self._options.first_chunk_frames,
                left_context_frames=self._options.left_context_frames,
            )
        window = self._vocoder.add(frame)
        if window is not None:
            yield from self._decode(window, deltas)
        self._finish_if_done(deltas)

    def _decode(self, window: Code2WavWindow, deltas: list[Delta]) -> Generator[Call, Any, None]:
        assert self._vocoder is not None
        pcm = self._vocoder.audio((yield Call(self._engine.code2wav, "code2wav", window)))
        if pcm.size:
            deltas.append(AudioDelta(pcm))

    # ---------------------------------------------------------------------------------------------- thinker
    def _prefill(self, deltas: list[Delta]) -> FrameRequest | None:
        inputs = self._plan.inputs.tensors(self._device, self._dtype)
        plan = self._plan
        encoded = self._engine.encode_prompt(
            inputs, plan.conversation_id, plan.inputs.audio_keys, talker_states=self._audio
        )
        out, self._cached_tokens = encoded.output, encoded.start
        new_states = None
        if self._audio:  # the embeddings and the talker's accepted layer, for every prompt position
            layer = self._config.talker_config.accept_hidden_layer
            new_states = torch.cat([out.hidden_states[0], out.hidden_states[layer]])
        self._prompt = encoded.whole(new_states)
        talker_states = self._prompt.talker_states
        self._decoder = self._engine.acquire_decoder(
            prompt_tokens=self._plan.inputs.prompt_tokens,
            request_id=self._plan.request_id,
        )
        self.decoding = "static" if isinstance(self._decoder, SlotSeats) else "eager"
        self._decoder.begin_thinker(out.past_key_values, encoded.rope_delta)
        self._accept_text(self._text_sampler(out.logits[:, -1], self._history_tensor()), deltas)
        if talker_states is None or self._thinker_done or self._text.in_call:
            # Nothing to say: text output only; an answer that begins with a function call; or a first token that
            # already ends the answer (end of text, max_tokens 1, a stop string): the final token is never spoken (its
            # slot would carry tts_eos, which this talker, having no slot before its prefill, would never read).
            # generate() fails on such an answer.
            self._talker_done = True
            self._finish_if_done(deltas)
            return None
        hidden = self._talker_prefill(inputs, talker_states)
        return FrameRequest(hidden, self._pick_first_code())

    def _accept_text(self, token: int, deltas: list[Delta]) -> None:
        """Record a new thinker token, stream its text, and publish it as the talker's text input."""
        self.text_ids.append(token)
        self._text_history.append(token)
        if token not in self._eos_ids:
            deltas.extend(self._text.push(token))
        final = token in self._eos_ids or len(self.text_ids) >= self._plan.max_text_tokens or self._text.stopped
        self._thinker_done = final
        if self._audio and len(self.text_ids) >= 2 and not self._speech_closed:  # token 0 is in the talker prefill
            # the answer's end, or the token that begins a function call, ends the talker's text: tts_eos in its slot
            self._speech_closed = final or self._text.in_call
            self._trailing_text.append(self._tts_eos if self._speech_closed else self._project_text(token))

    def _history_tensor(self) -> torch.Tensor:
        return torch.tensor([self._text_history], device=self._device)

    def _project_text(self, token: int) -> torch.Tensor:
        embedding = self._model.thinker.get_input_embeddings()(torch.tensor([[token]], device=self._device))
        return self._model.talker.text_projection(embedding)

    # ----------------------------------------------------------------------------------------------- talker
    def _talker_prefill(self, inputs: dict[str, torch.Tensor], thinker_states: torch.Tensor) -> torch.Tensor:
        """The talker prompt, as `generate()` builds it: the user turns (text positions projected from the thinker
        embeddings, audio positions from a middle thinker layer) and the assistant head with the speaker id.
        `thinker_states` is `[2, prompt, hidden]`: the thinker's embeddings and its accepted layer."""
        model, config = self._model, self._config
        talker, ids = model.talker, inputs["input_ids"]
        thinker_embedding = model.thinker.get_input_embeddings()
        special = torch.tensor(
            [[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]], device=self._device
        )
        tts_bos, self._tts_eos, self._tts_pad = talker.text_projection(thinker_embedding(special)).chunk(3, dim=1)
        thinker_config = config.thinker_config
        multimodal = (
            (ids == thinker_config.audio_token_id)
            | (ids == thinker_config.image_token_id)
            | (ids == thinker_config.video_token_id)
        )
        host_ids = self._plan.inputs.input_ids[0]  # turn boundaries are read on the host: no GPU round trips
        user_positions = _user_turn_mask(host_ids, config.im_start_token_id, config.user_token_id).to(self._device)
        prompt_embeds, accepted_hidden = thinker_states[:1], thinker_states[1:]
        user_part = model._get_talker_user_parts(0, ids.shape[1], multimodal, accepted_hidden, prompt_embeds)
        assistant_start = int(torch.nonzero(host_ids == config.im_start_token_id)[-1])  # "<|im_start|>assistant\n"
        first_text = thinker_embedding(torch.tensor([self.text_ids[:1]], device=self._device))
        assistant_part, assistant_ids, _ = model._get_talker_assistant_parts(
            0,
            4,
            self._plan.speaker_id,
            torch.cat([prompt_embeds[:, assistant_start:], first_text], dim=1),
            self._tts_pad,
            tts_bos,
            self._tts_eos,
        )
        embeds = torch.cat([user_part[:, user_positions], assistant_part], dim=1)
        talker_ids = torch.cat([ids[:, user_positions], assistant_ids], dim=1)
        feature_mask = inputs.get("feature_attention_mask")
        positions = talker.compute_3d_position_ids(
            embeds,
            talker_input_ids=talker_ids,
            attention_mask=torch.ones_like(talker_ids),
            past_key_values=None,
            image_grid_thw=inputs.get("image_grid_thw"),
            audio_feature_lengths=feature_mask.sum(1) if feature_mask is not None else None,
        )
        out = talker.model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
        assert self._decoder is not None
        self._decoder.begin_talker(out.past_key_values, int(talker.rope_deltas.reshape(-1)[0]))
        hidden = out.last_hidden_state[:, -1:]
        self._talker_logits = talker.codec_head(hidden[:, -1]).float()
        eos = None if self._options.ignore_eos else config.talker_config.codec_eos_token_id
        self._codec_bias = _codec_bias(self._talker_logits, eos)
        self._codes_seen = torch.zeros_like(self._talker_logits, dtype=torch.bool)
        return hidden

    def _pick_first_code(self) -> torch.Tensor:
        """Codebook 0 as `generate()` draws it: special codec ids but EOS suppressed, repetition penalised."""
        sampling = self.talker_sampling
        logits = self._talker_logits + self._codec_bias
        if sampling.repetition_penalty != 1.0:
            penalty = sampling.repetition_penalty
            logits = torch.where(self._codes_seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        return pick_tokens(
            logits,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            generators=(self.generator,),
        )

    def _end_speech(self, deltas: list[Delta]) -> Generator[Call, Any, None]:
        self._talker_done = True
        if self._vocoder is not None and (window := self._vocoder.rest()) is not None:
            yield from self._decode(window, deltas)
        if self._decoder is not None:
            self._decoder.end_talker()
        self._finish_if_done(deltas)

    def _finish_if_done(self, deltas: list[Delta]) -> None:
        if self._thinker_done and self._talker_done and not self._finished:
            deltas.extend(self._text.flush())
            output_tokens = sum(1 for token in self.text_ids if token not in self._eos_ids)
            deltas.append(
                Usage(
                    input_tokens=self._plan.inputs.prompt_tokens,
                    output_tokens=output_tokens,
                    cached_input_tokens=self._cached_tokens,
                )
            )
            self.close()


def step_generations(generations: Sequence[Qwen3Generation]) -> list[list[Delta] | BaseException]:
    """One step of every generation: the thinker and talker calls on shared slots each run once for all sessions,
    and so does the code predictor (its work per frame has the same shape for every session: 2 prefill positions,
    then 14 single steps, fresh cache each frame)."""
    with torch.inference_mode():
        return run_steps([generation.plan_step() for generation in generations], DECODE_ORDER)


def predict_residuals(
    talker: torch.nn.Module,
    requests: Sequence[FrameRequest],
    sampling: TalkerSampling,
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The code predictor's 15 residual codes for each request, batched.

    Returns the complete frames `[rows, 16]` and, per row, the summed embedding of its 16 codes `[rows, 1, hidden]`:
    what `generate()` feeds the talker next (the predictor's per-step input embeddings).
    """
    predictor = talker.code_predictor
    residual_embedding = predictor.get_input_embeddings()
    first_codes = torch.cat([request.first_code for request in requests])
    embedding_sum = talker.get_input_embeddings()(first_codes).unsqueeze(1)
    inputs = torch.cat([torch.cat([request.hidden for request in requests]), embedding_sum], dim=1)
    codes = [first_codes]
    cache: Cache | None = None
    for group in range(len(residual_embedding)):
        out = predictor.model(inputs_embeds=inputs, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        code = pick_tokens(
            predictor.lm_head[group](out.last_hidden_state[:, -1]).float(),
            temperature=0.0 if sampling.greedy else 1.0,
            top_k=sampling.predictor_top_k,
            top_p=sampling.predictor_top_p,
            generators=generators,
        )
        codes.append(code)
        inputs = residual_embedding[group](code).unsqueeze(1)
        embedding_sum = embedding_sum + inputs
    return torch.stack(codes, dim=1), embedding_sum


class CodePredictor(torch.nn.Module):
    """Runs the code predictor for a batch of frame requests: eagerly with a KV cache (`predict_residuals`), or,
    with the `cuda_graphs` switch, as `UnrolledCodePredictor`. A module, so profilers and benchmarks can hook it."""

    def __init__(self, talker: torch.nn.Module, sampling: TalkerSampling) -> None:
        super().__init__()
        self.talker = talker
        self.sampling = sampling

    def forward(
        self, requests: Sequence[FrameRequest], generators: Sequence[torch.Generator | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_residuals(self.talker, requests, self.sampling, generators)

    def run(self, part: str, calls: list[Any]) -> list[Any]:
        """Answer the "predictor" calls `(FrameRequest, generator)` of one step: one complete frame and its summed
        code embedding each."""
        frames, embedding_sums = self([request for request, _ in calls], [generator for _, generator in calls])
        return [(frames[row], embedding_sums[row : row + 1]) for row in range(len(calls))]


def planned_batch_sizes(largest: int) -> tuple[int, ...]:
    """The batch sizes predictor graphs are captured for: 1, 2, 4, ... below `largest`, and `largest` itself. A batch
    runs in the smallest of them that holds it (padded), so a few graphs cover every batch."""
    sizes, size = [], 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


class UnrolledCodePredictor(CodePredictor):
    """The 15 predictor passes of a frame with fixed shapes, replayed as one CUDA graph on CUDA.

    Without a KV cache each pass re-reads the positions so far (2 to 16: negligible work next to reading the
    weights), so every pass has a static shape and a whole frame (75 layer calls, each a handful of kernel
    launches) becomes one graph replay. Sampling uses the Gumbel-max trick: noise is drawn before the replay from
    each row's generator, so seeded requests still repeat. Off CUDA the same passes run eagerly.

    The graphs are captured by `capture_graphs` at start-up, never during live traffic (a capture stalls every
    session): one per planned batch size, all in one memory pool (they replay one at a time, outputs are copied).
    The causal mask is additive, which SDPA and eager attention both read (flash_attention_2 is refused).
    """

    def __init__(self, talker: torch.nn.Module, sampling: TalkerSampling) -> None:
        super().__init__(talker, sampling)
        predictor = talker.code_predictor
        self._parameter = next(predictor.parameters())
        self._groups = len(predictor.get_input_embeddings())
        self._vocab = predictor.config.vocab_size
        self._graphs: dict[int, _PredictorGraph] = {}

    @property
    def graph_sizes(self) -> tuple[int, ...]:
        """The batch sizes with a captured graph (none off CUDA or after a failed capture)."""
        return tuple(sorted(self._graphs))

    @torch.inference_mode()  # as the steps that replay them run
    def capture_graphs(self, largest_batch: int) -> None:
        """Capture the frame for every planned batch size up to `largest_batch`; if any capture fails, log it and
        keep running eagerly (no graph at all, so every batch takes the same path)."""
        sizes = planned_batch_sizes(largest_batch)
        try:
            pool = _PredictorGraph.memory_pool()
            for size in sizes:
                self._graphs[size] = _PredictorGraph(self, size, pool)
        except RuntimeError:
            log.exception("%s: capturing the code predictor in CUDA graphs failed; running it eagerly", ENGINE_NAME)
            self._graphs.clear()
            return
        log.info("%s: captured the code predictor as CUDA graphs for batch sizes %s", ENGINE_NAME, list(sizes))

    def forward(
        self, requests: Sequence[FrameRequest], generators: Sequence[torch.Generator | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.cat([request.hidden for request in requests])
        first_codes = torch.cat([request.first_code for request in requests])
        noise = self._noise(generators)
        fitting = [size for size in self._graphs if size >= len(requests)]
        if not fitting:
            return self.frame(hidden, first_codes, noise)
        return self._graphs[min(fitting)].replay(hidden, first_codes, noise)

    def _noise(self, generators: Sequence[torch.Generator | None]) -> torch.Tensor | None:
        """Gumbel noise `[groups, rows, vocab]`, each row from its own generator (None when decoding greedily)."""
        if self.sampling.greedy:
            return None
        shape = (self._groups, self._vocab)
        device = self._parameter.device
        uniform = torch.stack(
            [torch.rand(shape, generator=generator, device=device) for generator in generators], dim=1
        )
        return -torch.log(-torch.log(uniform.clamp_min(1e-20)))

    def frame(
        self, hidden: torch.Tensor, first_codes: torch.Tensor, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The 15 passes on `[rows, 1, hidden]` talker states and `[rows]` first codes (fixed shapes throughout)."""
        talker = self.talker
        model = talker.code_predictor.model
        residual_embedding = talker.code_predictor.get_input_embeddings()
        embedding_sum = talker.get_input_embeddings()(first_codes).unsqueeze(1)
        sequence = torch.cat([hidden, embedding_sum], dim=1)
        codes = [first_codes]
        for group in range(self._groups):
            length = sequence.shape[1]
            positions = torch.arange(length, device=sequence.device).unsqueeze(0)
            mask = torch.full((length, length), -float("inf"), device=sequence.device, dtype=sequence.dtype).triu(1)
            position_embeddings = model.rotary_emb(sequence, positions)
            states = sequence
            for layer in model.layers:
                states = layer(
                    states,
                    attention_mask=mask[None, None],
                    position_ids=positions,
                    position_embeddings=position_embeddings,
                )
            logits = talker.code_predictor.lm_head[group](model.norm(states[:, -1])).float()
            code = self._choose(logits, None if noise is None else noise[group])
            codes.append(code)
            embedding = residual_embedding[group](code).unsqueeze(1)
            embedding_sum = embedding_sum + embedding
            sequence = torch.cat([sequence, embedding], dim=1)
        return torch.stack(codes, dim=1), embedding_sum

    def _choose(self, logits: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is None:
            return torch.argmax(logits, dim=-1)
        scores = _filtered_scores(logits, 1.0, self.sampling.predictor_top_k, self.sampling.predictor_top_p)
        return torch.argmax(scores + noise, dim=-1)


class _PredictorGraph:
    """One captured `UnrolledCodePredictor.frame` for `rows` rows, with its static input buffers; a smaller batch
    fills its first rows (the others hold stale inputs, and rows never mix)."""

    @staticmethod
    def memory_pool() -> Any:
        return torch.cuda.graph_pool_handle()

    def __init__(self, predictor: UnrolledCodePredictor, rows: int, pool: Any) -> None:
        device, dtype = predictor._parameter.device, predictor._parameter.dtype
        width = predictor.talker.get_input_embeddings().embedding_dim
        self._hidden = torch.zeros(rows, 1, width, dtype=dtype, device=device)
        self._first_codes = torch.zeros(rows, dtype=torch.long, device=device)
        self._noise = (
            None if predictor.sampling.greedy else torch.zeros(predictor._groups, rows, predictor._vocab, device=device)
        )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
            predictor.frame(self._hidden, self._first_codes, self._noise)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, pool=pool):
            self._codes, self._embedding_sum = predictor.frame(self._hidden, self._first_codes, self._noise)

    def replay(
        self, hidden: torch.Tensor, first_codes: torch.Tensor, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.shape[0]
        self._hidden[:rows].copy_(hidden)
        self._first_codes[:rows].copy_(first_codes)
        if self._noise is not None and noise is not None:
            self._noise[:, :rows].copy_(noise)
        self._graph.replay()
        return self._codes[:rows].clone(), self._embedding_sum[:rows].clone()


def _codec_bias(logits: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """0 for allowed codebook-0 ids, -inf for the special ids `generate()` suppresses (all but codec EOS)."""
    bias = torch.zeros_like(logits)
    bias[..., logits.shape[-1] - SUPPRESSED_CODEC_TAIL :] = -float("inf")
    if eos_id is not None:
        bias[..., eos_id] = 0.0
    return bias


def _user_turn_mask(ids: torch.Tensor, im_start_id: int, user_id: int) -> torch.Tensor:
    """True at every position of a user turn (from its `<|im_start|>` to the next one): the talker's prompt."""
    starts = torch.nonzero(ids == im_start_id).flatten().tolist()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for start, end in zip(starts, [*starts[1:], ids.shape[0]], strict=True):
        if start + 1 < ids.shape[0] and int(ids[start + 1]) == user_id:
            mask[start:end] = True
    return mask


# ---------------------------------------------------------------------------------------------- the engine
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


def grouped_mm_falls_back(device: torch.device) -> bool:
    """Whether transformers' grouped_mm experts would take their per-expert fallback on `device`, which reads the
    expert offsets back to the host in every MoE layer (torch < 2.9 off Hopper, or a GPU below SM80)."""
    if device.type != "cuda":
        return False
    from transformers.integrations.moe import _can_use_grouped_mm

    probe = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
    return not _can_use_grouped_mm(probe, probe.unsqueeze(0), torch.ones(1, dtype=torch.int32, device=device))


def check_experts(
    options: Qwen3OmniOptions,
    device: torch.device,
    falls_back: Callable[[torch.device], bool] = grouped_mm_falls_back,
) -> None:
    """Refuse, before any weight is loaded, an experts kernel that cannot work with the other options on `device`."""
    experts = options.experts_implementation or "grouped_mm"
    if experts not in EXPERTS_IMPLEMENTATIONS:
        raise EngineError(f"{ENGINE_NAME}: experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS} or null")
    if device.type != "cuda":
        return
    if experts == "eager" and options.cuda_graphs and options.static_cache:
        raise EngineError(
            f"{ENGINE_NAME}: cuda_graphs with static_cache captures the MoE thinker and talker steps, and "
            "experts_implementation eager picks its experts on the host, which a CUDA graph cannot hold; use "
            "experts_implementation grouped_mm (the default) or batched_mm, or turn cuda_graphs off"
        )
    if experts == "grouped_mm" and falls_back(device):
        raise EngineError(
            f"{ENGINE_NAME}: experts_implementation grouped_mm has no kernel for torch {torch.__version__} on this GPU "
            "and would wait on the host in every MoE layer; use torch >= 2.9 on an SM80+ GPU, or set "
            "experts_implementation: batched_mm"
        )


class Qwen3OmniEngine(QwenOmniEngine):
    """Qwen3-Omni-30B-A3B (or any local checkpoint of that architecture) streamed through one GPU worker."""

    name = ENGINE_NAME
    audio_tokens_per_second = 12.5
    _model: Qwen3OmniMoeForConditionalGeneration | None

    def __init__(self, model: str = DEFAULT_MODEL, **options: Any) -> None:
        self.options = options_from_mapping(Qwen3OmniOptions, options, engine=ENGINE_NAME)
        super().__init__(model, self.options)
        check_experts(self.options, self.runtime.device)
        self._code_predictor: CodePredictor | None = None
        self._code2wav: Code2WavBatcher | None = None

    @property
    def code2wav(self) -> Code2WavBatcher:
        if self._code2wav is None:
            raise EngineError(f"{ENGINE_NAME}: the model is not loaded or has no talker")
        return self._code2wav

    @property
    def code_predictor(self) -> CodePredictor:
        if self._code_predictor is None:
            raise EngineError(f"{ENGINE_NAME}: the model is not loaded or has no talker")
        return self._code_predictor

    def load(self) -> None:
        self.install(*self.load_weights())

    def load_weights(self) -> tuple[Qwen3OmniMoeForConditionalGeneration, PreTrainedTokenizerBase]:
        """The checkpoint and its tokenizer through `from_pretrained` (benchmarks override this with random weights)."""
        experts = self.options.experts_implementation
        tokenizer = load_tokenizer(self.model_id, engine=ENGINE_NAME)
        model = load_pretrained(
            Qwen3OmniMoeForConditionalGeneration,
            self.model_id,
            self.runtime,
            engine=ENGINE_NAME,
            **({} if experts is None else {"experts_implementation": experts}),
        )
        return model, tokenizer

    def install(self, model: Qwen3OmniMoeForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
        """Check a loaded model against the options and derive the per-model constants every request uses."""
        if not self.options.enable_audio and model.has_talker:
            model.disable_talker()
        if model.has_talker:
            if not hasattr(model.talker.config, "audio_config"):
                # transformers 5.23: the talker's rope index reads `config.audio_config.n_window` for prompts with
                # both an image and audio, and its config has none (generate() fails the same way)
                model.talker.config.audio_config = model.config.thinker_config.audio_config
            speakers = {name.lower() for name in model.config.talker_config.speaker_id}
            missing = [voice for voice in VOICES if voice.lower() not in speakers]
            if missing:
                raise EngineError(f"{ENGINE_NAME}: {self.model_id!r} lacks the speakers {missing}")
            if self.options.cuda_graphs:
                predictor = UnrolledCodePredictor(model.talker, self.options.talker_sampling)
                if self.runtime.device.type == "cuda":
                    predictor.capture_graphs(self.max_active if self.options.batch_sessions else 1)
                self._code_predictor = predictor
            else:
                self._code_predictor = CodePredictor(model.talker, self.options.talker_sampling)
            self._code2wav = Code2WavBatcher(model.code2wav)
            if self.options.prewarm and self.runtime.device.type == "cuda":
                reach = code2wav_receptive_field(model.code2wav.config)[1]
                context = reach if self.options.left_context_frames is None else self.options.left_context_frames
                longest = self.options.chunk_frames + min(reach, context)
                prewarm_code2wav(model.code2wav, longest, self.max_active if self.options.batch_sessions else 1)
            if self.options.static_cache:
                self.slots = Qwen3SlotPool(
                    model,
                    slots=self.max_active,
                    thinker_tokens=self.options.static_cache_tokens,
                    talker_tokens=self.options.static_cache_tokens + self.options.max_audio_frames,
                    dtype=self.runtime.dtype,
                    device=self.runtime.device,
                    graphs=self.options.cuda_graphs and self.runtime.device.type == "cuda",
                )
        eos = {tokenizer.convert_tokens_to_ids(token) for token in TEXT_EOS_TOKENS}
        configured = model.thinker.generation_config.eos_token_id
        eos |= set(configured if isinstance(configured, list) else [] if configured is None else [configured])
        self.text_eos_ids = frozenset(token for token in eos if isinstance(token, int) and token >= 0)
        self.default_text_sampling = Sampling.from_generation_config(model.thinker.generation_config)
        self._prompts = PromptBuilder(
            tokenizer,
            prompt_format(model.config.thinker_config.vision_config),
            system_prompt=self.options.system_prompt,
        )
        self._tokenizer, self._model = tokenizer, model
        self.context_tokens = model.config.thinker_config.text_config.max_position_embeddings
        log.info(
            "%s: loaded %s (%.2f B parameters, audio %s, experts %s)",
            ENGINE_NAME,
            self.model_id,
            sum(p.numel() for p in model.parameters()) / 1e9,
            "on" if self.audio_enabled else "off",
            self.options.experts_implementation or "default",
        )

    def unload(self) -> None:
        self._code_predictor = self._code2wav = None
        self.slots = None
        self._model = None
        self._tokenizer = None
        self._prompts = None

    def step_batch(self) -> StepBatch | None:
        return step_generations if self.options.batch_sessions else None  # type: ignore[return-value]

    def growing_caches(self) -> EagerDecoder:
        return EagerDecoder(self.model)

    def prepare(self, request: ResponseRequest) -> TurnPlan:
        if self._prompts is None:
            raise EngineError(f"{ENGINE_NAME}: the model is not loaded")
        sampling = request.sampling
        speaker = resolve_speaker(request.voice, VOICES, self.options.voice)
        forced, suppressed = self._prompts.tool_choice_tokens(request)
        return TurnPlan(
            inputs=self._prompts.build(request),
            speaker_id=self.model.config.talker_config.speaker_id[speaker.lower()] if self.audio_enabled else -1,
            text_sampling=self.default_text_sampling.overridden(
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
            ),
            max_text_tokens=sampling.max_tokens or self.options.max_text_tokens,
            output_audio=request.output_audio,
            seed=sampling.seed,
            request_id=request.request_id,
            conversation_id=request.conversation_id,
            stop=sampling.stop,
            tools=request.tools_enabled,
            forced_ids=forced,
            suppressed_ids=suppressed,
        )

    def make_generation(self, prepared: TurnPlan) -> Qwen3Generation:
        return Qwen3Generation(self, prepared)
