"""Qwen2.5-Omni engine: text as the thinker writes it, speech as each vocoder chunk is ready.

transformers' `generate()` runs the whole thinker, then the whole talker, then token2wav, so the first sample of
speech exists only when the answer is complete. This engine drives the same modules step by step:

* the thinker decodes one text token per step; its text is streamed at once;
* the talker's step k consumes the *reply vector* (last hidden state + input embedding) of thinker token k+1, so
  the thinker runs exactly one token ahead of the talker; after the thinker's end the talker reads `tts_eos`, then
  `tts_pad` for ever, as in `generate()`;
* token2wav (a flow-matching DiT plus BigVGAN) has no chunk API in transformers; `Token2WavStream` (module
  `qwen2_5_token2wav`) re-implements the official schedule (72-mel chunks with 48 mel of past and 24 of look-ahead,
  BigVGAN re-run with 20 mel of overlap each side) with one seeded noise tensor per utterance, so 480 samples come
  out per codec code.

Multi-turn: each prompt holds the whole conversation (user audio, assistant turns as the text that was heard). The
thinker KV of a conversation's last prompt is kept (`prefix_cache.py`, option `prefix_cache_sessions`), and a turn
whose prompt continues it encodes only its new part; truncated or edited history does not continue it and is
encoded whole, so what was heard is always honoured exactly. `benchmarks/engine_latency.py` reports both prefills.

Decode steps run either through the model's own `forward` on growing caches (`EagerDecoder`, the default and the
reference, one session per call) or on preallocated slots with fixed shapes (`SlotPool`, option `static_cache`),
where the steps of all sessions run as one batch and can be replayed as CUDA graphs (option `cuda_graphs`). Rope
offsets are kept per generation and positions are passed explicitly, because the model classes store them on the
module and interleaved sessions would overwrite each other's. Text-only requests (`output_audio=False`) run the
thinker alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from transformers import Cache, PreTrainedTokenizerBase, Qwen2_5OmniForConditionalGeneration

from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioDelta,
    AudioPart,
    Delta,
    EngineError,
    Message,
    ResponseRequest,
    SamplingParams,
    Usage,
)
from omnivox.pipeline.engines.prefix_cache import Prefix, keep_prompt
from omnivox.pipeline.engines.qwen2_5_token2wav import DitSolver, Token2WavStream, Voice, cast_dit
from omnivox.pipeline.engines.qwen_common import (
    DTYPES,
    INSTRUCTIONS_TURNS,
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
    qwen2_5_audio_tokens,
    resolve_speaker,
    text_position,
)
from omnivox.pipeline.engines.scheduler import StepBatch
from omnivox.pipeline.engines.slots import Decoder, GrowingCaches, SlotPool, SlotSeats
from omnivox.pipeline.engines.stepping import StepPlan, only_result, run_steps

log = logging.getLogger(__name__)

ENGINE_NAME = "qwen2.5-omni"
DEFAULT_MODEL = "Qwen/Qwen2.5-Omni-7B"
SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)
"""The Qwen2.5-Omni model card requires exactly this system prompt for speech output."""


def prompt_format(vision_config: Any) -> PromptFormat:
    """Qwen2.5-Omni's placeholders; images are cut with the checkpoint's own patch geometry (CLIP normalisation)."""
    return PromptFormat(
        audio_start="<|audio_bos|>",
        audio_placeholder="<|AUDIO|>",
        audio_end="<|audio_eos|>",
        audio_tokens=qwen2_5_audio_tokens,
        max_audio_seconds=30.0,
        image=ImageFormat(
            start="<|vision_bos|>",
            placeholder="<|IMAGE|>",
            end="<|vision_eos|>",
            patch_size=vision_config.patch_size,
            temporal_patch_size=vision_config.temporal_patch_size,
            merge_size=vision_config.spatial_merge_size,
        ),
    )


TEXT_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class Qwen25OmniOptions(EngineOptions):
    """The `engine.options` of `qwen2.5-omni` in the YAML config (with the shared ones of `EngineOptions`); every
    field is one documented switch. At 7B a decode slot (`static_cache`) holds about 0.6 GB at the default lengths,
    and a stored prompt about 57 KB per token."""

    voice: str = "Chelsie"
    """Speaker for requests whose voice maps to no speaker of the checkpoint (Chelsie or Ethan)."""
    system_prompt: str = SYSTEM_PROMPT
    """The model's system prompt, the first turn of every prompt. The official one, byte for byte, is needed for
    speech output: change it only for text-only use."""
    instructions_turn: str = "system"
    """Where the caller's instructions go: "system", a second system turn right after the official one; "user", the
    head of the first user turn; "append", appended to the system prompt (the first turn is then no longer the
    official one). Both "system" and "user" keep the official turn exact and the prompt's beginning the same from
    turn to turn (so a conversation's stored prompt stays reusable); "system" keeps them the operator's words rather
    than the caller's. Which of the two the 7B follows better is not measured (no weights here)."""
    max_audio_codes: int = 4096
    """Longest spoken answer in codec codes (20 ms each: 82 s), as `generate()`'s `talker_max_new_tokens`."""
    talker_top_k: int = 40
    talker_top_p: float = 0.8
    talker_attention_mask: bool = True
    """Give the talker its attention mask, as the model code is written: TMRoPE positions and the codec pad/bos
    prefill embeddings are applied only then. transformers 5.23's `generate()` drops an all-ones mask and so runs
    the talker without both; False reproduces `generate()` exactly (the tests use it)."""
    dit_steps: int = 10
    """ODE steps of the token2wav DiT (the official 10, reference-exact). Fewer steps cut vocoder time
    proportionally; 5 steps moved the mel by 2.7 % (random weights, so not a quality measure): not verified by ear,
    listen before lowering it."""
    dit_dtype: str = "float32"
    """DiT precision: the official float32 (reference-exact; the checkpoint's token2wav is loaded in float32), or
    bfloat16 (on an H100 about 1.1x faster eager and 2.7x inside a CUDA graph, mel deviation 0.65 % on random
    weights; not verified by ear). Either way the time embedding and the speaker encoder run in float32 and BigVGAN
    stays float32."""
    first_chunk_codes: int = 48
    """Codes (20 ms each) before the first vocoder chunk. 48 is the official schedule (72 mel kept, 24 of
    look-ahead, 0.52 s of audio first). Fewer gives earlier first audio with less look-ahead for the first chunk
    (down to 24: 48 mel kept with no look-ahead, 0.28 s of audio first), at the risk of a gap before chunk two."""
    chunk_ramp_mel: tuple[int, ...] = ()
    """Mel kept by the chunks after the first (multiples of 24 up to 72), before the official 72-mel chunks; empty is
    the official schedule. A small first chunk runs out before a full second chunk is made: `[24, 24, 48]` after
    `first_chunk_codes: 24` keeps the first audio at 24 codes with no gap up to 9.3 ms per code with 56 ms DiT
    chunks (`qwen2_5_token2wav.simulate_playout`), at the cost of two more DiT runs in the first 1.4 s. Ramp chunks
    keep their full past and look-ahead."""
    cuda_graphs: bool = False
    """Replay each thinker and talker decode step as a CUDA graph (needs `static_cache` and a CUDA device). On an
    H100 at 7B size this took steps from 20/17 ms to 8.6/3.9 ms (research measurement, one session); one graph for
    the thinker step and one for the talker step of all slots are captured at start-up. Not verified bit-exact
    against the eager path in bf16 (masked SDPA over the slot differs in rounding)."""

    dit_cuda_graph: bool = False
    """Replay the whole DiT integration of the regular chunk windows as one CUDA graph each (needs CUDA). Same math;
    on an H100 a 144-mel window took 56 ms instead of 305 ms (bf16, 5 steps) and 344 instead of 736 ms (fp32, 10
    steps) in the research measurement. Captured at start-up (about 1 s per window length). An utterance's last,
    shorter window is padded to a regular one with frames masked out of attention, so it replays a graph too instead
    of stalling the end of the speech on an eager run (same mel, checked on CPU)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cuda_graphs and not self.static_cache:
            raise ValueError("cuda_graphs needs static_cache: true")
        if self.dit_dtype not in DTYPES:
            raise ValueError(f"dit_dtype must be one of {list(DTYPES)}, got {self.dit_dtype!r}")
        if not 2 <= self.dit_steps <= 64:
            raise ValueError(f"dit_steps must be in [2, 64], got {self.dit_steps}")
        object.__setattr__(self, "chunk_ramp_mel", tuple(self.chunk_ramp_mel))  # YAML gives a list
        Token2WavStream.check_schedule(self.first_chunk_codes, self.chunk_ramp_mel)
        if self.max_audio_codes < 1:
            raise ValueError("max_audio_codes must be >= 1")
        if self.instructions_turn not in INSTRUCTIONS_TURNS:
            raise ValueError(f"instructions_turn must be one of {INSTRUCTIONS_TURNS}, got {self.instructions_turn!r}")

    @property
    def talker_sampling(self) -> Sampling:
        return Sampling(
            temperature=self.talker_temperature,
            top_k=self.talker_top_k,
            top_p=self.talker_top_p,
            repetition_penalty=self.talker_repetition_penalty,
        )


# ---------------------------------------------------------------------------------------------- decode steps
DECODE_ORDER = ("thinker", "talker")
"""Within one step the thinker's call comes first: the talker step reads the reply vector it makes."""


class EagerDecoder(GrowingCaches):
    """Qwen2.5's decode steps on one request's growing caches."""

    def __init__(self, model: Qwen2_5OmniForConditionalGeneration) -> None:
        super().__init__()
        self._model = model
        self._device = next(model.thinker.parameters()).device

    def thinker_step(self, token: int, want_reply: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Feed one text token: (its reply vector `[1, hidden]` if wanted, next-token logits `[1, vocab]`)."""
        assert self.thinker_cache is not None
        output = self._model.thinker(
            input_ids=torch.tensor([[token]], device=self._device),
            position_ids=text_position(self.thinker_cache.get_seq_length() + self.thinker_rope_delta, self._device),
            past_key_values=self.thinker_cache,
            use_cache=True,
            output_hidden_states=want_reply,
        )
        reply = output.hidden_states[-1][:, -1] + output.hidden_states[0][:, -1] if want_reply else None
        return reply, output.logits[:, -1]

    def talker_step(self, code: int, reply: torch.Tensor) -> torch.Tensor:
        """Feed one codec code plus the reply vector of its text slot: next-code logits `[1, codec vocab]`."""
        assert self.talker_cache is not None
        output = self._model.talker(
            input_ids=torch.tensor([[code]], device=self._device),
            thinker_reply_part=reply[:, None],
            position_ids=text_position(self.talker_cache.get_seq_length() + self.talker_rope_delta, self._device),
            past_key_values=self.talker_cache,
            use_cache=True,
        )
        return output.logits[:, -1]


class Qwen25SlotPool(SlotPool):
    """Qwen2.5's decode slots: the thinker and talker steps of every session at once.

    Each call group becomes one embedding lookup, one batched decoder step (a CUDA graph replay with
    `cuda_graphs`) and one head, whatever the number of sessions in it.
    """

    def __init__(self, model: Qwen2_5OmniForConditionalGeneration, **options: Any) -> None:
        super().__init__(model, **options)
        self._codec_embed, self._to_talker = model.talker.get_input_embeddings(), model.talker.thinker_to_talker_proj

    def run(self, part: str, calls: list[Any]) -> list[Any]:
        if part == "thinker":
            embeds, hidden, logits = self.thinker_step(calls)
            replies = hidden + embeds[:, -1]
            return [
                (replies[row : row + 1] if args[2] else None, logits[row : row + 1]) for row, args in enumerate(calls)
            ]
        codes = torch.tensor([[args[1]] for args in calls], device=self.device)
        replies = torch.cat([args[2].reshape(1, 1, -1) for args in calls])
        hidden = self.talker.step([args[0] for args in calls], self._to_talker(self._codec_embed(codes) + replies))
        logits = self.codec_head(hidden).float()
        return [logits[row : row + 1] for row in range(len(calls))]


# ---------------------------------------------------------------------------------------------- one request
@dataclass(frozen=True)
class TurnPlan:
    """Everything decided per request before the GPU sees it."""

    inputs: ModelInputs
    speaker: str
    text_sampling: Sampling
    max_text_tokens: int
    output_audio: bool
    seed: int | None
    max_audio_codes: int
    request_id: str = ""
    conversation_id: str = ""
    stop: tuple[str, ...] = ()
    tools: bool = False
    """The request offers tools: the answer's text is split into speech and function calls."""
    forced_ids: tuple[int, ...] = ()
    """Tokens the answer begins with (a `required` or named tool choice)."""
    suppressed_ids: tuple[int, ...] = ()
    """Tokens the answer never holds (the call token under tool choice `none`)."""


class Qwen25Generation:
    """One request: thinker, talker and token2wav advanced together.

    Step 0 runs the thinker prefill, feeds the first text token (the talker prefill needs its reply vector) and
    runs the talker prefill. Every later step draws one codec code, feeds it to the vocoder stream, advances the
    thinker by one token and runs one talker step. Text-only requests advance the thinker alone.

    A step is written as a `StepPlan` that yields its decode calls, so the engine can run the steps of all sessions
    with one batched thinker call and one batched talker call (`step_generations`).
    """

    def __init__(self, engine: Qwen25OmniEngine, plan: TurnPlan) -> None:
        model = engine.model
        self._model = model
        self._engine = engine
        self._plan = plan
        self._options = engine.options
        self._device = engine.runtime.device
        self._text = AnswerText(engine.tokenizer, plan.stop, tools=plan.tools)
        self._eos_ids = engine.text_eos_ids
        generator, seed = make_generator(plan.seed, self._device)
        log.debug(
            "%s: request %r, %d prompt tokens, seed %d", ENGINE_NAME, plan.request_id, plan.inputs.prompt_tokens, seed
        )
        self._generator = generator
        self._audio = plan.output_audio and engine.audio_enabled
        self._text_sampler = TokenSampler(
            plan.text_sampling, generator, suppress_ids=plan.suppressed_ids, forced=plan.forced_ids
        )
        self.text_ids: list[int] = []
        self.codes: list[int] = []
        self._text_history: list[int] = plan.inputs.input_ids[0].tolist()
        self._started = False
        self._finished = False
        self._decoder: Decoder | None = None
        self._prompt: Prefix | None = None
        self._cached_tokens = 0
        """The encoded prompt, stored for the conversation's next turn when this request ends."""
        self.decoding = ""
        """"static" (a preallocated slot) or "eager" (growing caches), once the prefill has run."""
        self._thinker_done = False
        self._replies: list[torch.Tensor] = []
        self._talker_logits: torch.Tensor | None = None
        self._talker_history: list[int] = []
        self._talker_done = not self._audio
        self._speech_closed = False
        """A function call began: the talker gets no more text (it still speaks what it was given)."""
        self._talker_sampler: TokenSampler | None = None
        self._vocoder: Token2WavStream | None = None
        self._tts_eos: torch.Tensor | None = None
        self._tts_pad: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def close(self) -> None:
        """Drop every cache and tensor of this request so its memory can be reused at once; the encoded prompt goes
        back to the conversation's store for its next turn."""
        if self._decoder is not None:
            self._decoder.release()
            self._decoder = None
        if self._prompt is not None:
            keep_prompt(self._engine.prefixes, self._plan.conversation_id, self._prompt)
            self._prompt = None
        self._talker_logits = None
        self._replies = []
        self._vocoder = None
        self._finished = True

    def step(self) -> list[Delta]:
        """One step of this generation alone."""
        return only_result(step_generations([self]))

    def plan_step(self) -> StepPlan:
        deltas: list[Delta] = []
        if not self._started:
            self._started = True
            yield from self._prefill(deltas)
        elif not self._talker_done:
            yield from self._talker_step(deltas)
        else:
            yield from self._advance_thinker(deltas)
        if self._thinker_done and self._talker_done:
            deltas.extend(self._text.flush())
            deltas.append(
                Usage(
                    input_tokens=self._plan.inputs.prompt_tokens,
                    output_tokens=self._output_tokens(),
                    cached_input_tokens=self._cached_tokens,
                )
            )
            self.close()
        return deltas

    # -------------------------------------------------------------------------------- thinker
    def _prefill(self, deltas: list[Delta]) -> StepPlan:
        inputs = self._plan.inputs.tensors(self._device, self._engine.runtime.dtype)
        logits, cache, rope_delta, talker_states = self._encode_prompt(inputs)
        self._decoder = self._engine.acquire_decoder(
            prompt_tokens=self._plan.inputs.prompt_tokens,
            request_id=self._plan.request_id,
        )
        self.decoding = "static" if isinstance(self._decoder, SlotSeats) else "eager"
        self._decoder.begin_thinker(cache, rope_delta)
        self._accept_text(self._text_sampler(logits, self._history_tensor()), deltas)
        if talker_states is None:
            return deltas
        if self._text.in_call:  # the answer begins with a function call: there is nothing to speak
            self._talker_done = True
            return deltas
        yield from self._advance_thinker(deltas)
        self._talker_prefill(
            inputs["input_ids"], talker_states, inputs.get("feature_attention_mask"), inputs.get("image_grid_thw")
        )
        return deltas

    def _encode_prompt(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Cache, int, torch.Tensor | None]:
        """The thinker prefill (continuing the conversation's stored prompt where it can): (next-token logits, KV
        cache, rope offset, the talker's prompt states if it speaks)."""
        plan = self._plan
        encoded = self._engine.encode_prompt(
            inputs, plan.conversation_id, plan.inputs.audio_keys, talker_states=self._audio
        )
        output, self._cached_tokens = encoded.output, encoded.start
        new_states = None
        if self._audio:
            input_ids = inputs["input_ids"][:, encoded.start :]
            embeddings = output.hidden_states[0].clone()
            config = self._model.config.thinker_config
            multimodal = (input_ids == config.audio_token_index) | (input_ids == config.image_token_index)
            embeddings[multimodal] = 0  # generate() hides audio and image positions from the talker
            new_states = output.hidden_states[-1] + embeddings
        self._prompt = encoded.whole(new_states)
        return output.logits[:, -1], output.past_key_values, encoded.rope_delta, self._prompt.talker_states

    def _advance_thinker(self, deltas: list[Delta]) -> StepPlan:
        """Feed the newest text token: its reply vector for the talker and the next token (the thinker runs ahead)."""
        if self._thinker_done:
            return deltas
        newest = self.text_ids[-1]
        talker_listens = self._audio and not self._talker_done and not self._speech_closed
        if newest in self._eos_ids or len(self.text_ids) >= self._plan.max_text_tokens or self._text.stopped:
            self._thinker_done = True  # the last token is never fed: its talker slot carries tts_eos instead
            if talker_listens:
                self._replies.append(self._tts_embedding("eos"))
            return deltas
        if talker_listens and self._text.in_call:  # `newest` began a function call: its slot ends the speech
            self._speech_closed, talker_listens = True, False
            self._replies.append(self._tts_embedding("eos"))
        assert self._decoder is not None
        reply, logits = yield self._decoder.call("thinker", newest, talker_listens)
        if reply is not None:
            self._replies.append(reply)
        self._accept_text(self._text_sampler(logits, self._history_tensor()), deltas)
        return deltas

    def _accept_text(self, token_id: int, deltas: list[Delta]) -> None:
        self.text_ids.append(token_id)
        self._text_history.append(token_id)
        if token_id in self._eos_ids:
            return
        deltas.extend(self._text.push(token_id))

    def _history_tensor(self) -> torch.Tensor:
        """The ids `generate()` would hold (prompt and answer so far); only a repetition penalty reads them."""
        history = self._text_history if self._text_sampler.needs_history else self._text_history[-1:]
        return torch.tensor([history], device=self._device)

    def _output_tokens(self) -> int:
        return sum(1 for token in self.text_ids if token not in self._eos_ids)

    # -------------------------------------------------------------------------------- talker + vocoder
    def _talker_prefill(
        self,
        input_ids: torch.Tensor,
        prompt: torch.Tensor,
        feature_attention_mask: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
    ) -> None:
        model, talker = self._model, self._model.talker
        speaker = model.speaker_map[self._plan.speaker]
        speaker_bos = torch.tensor([[speaker["bos_token"]]], device=self._device)
        embeddings = torch.cat(
            [prompt, model.thinker.get_input_embeddings()(speaker_bos), self._replies[0][:, None]], dim=1
        )
        codec_prefix = [talker.codec_mask_token] * input_ids.shape[1] + [talker.codec_pad_token, talker.codec_bos_token]
        self._talker_history = list(codec_prefix)
        attention_mask = None
        if self._options.talker_attention_mask:
            attention_mask = torch.ones(1, embeddings.shape[1], dtype=torch.long, device=self._device)
        output = talker(
            input_ids=torch.tensor([codec_prefix], device=self._device),
            input_text_ids=torch.cat(
                [input_ids, speaker_bos, torch.tensor([self.text_ids[:1]], device=self._device)], 1
            ),
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            audio_feature_lengths=None if feature_attention_mask is None else feature_attention_mask.sum(1),
            image_grid_thw=image_grid_thw,
            use_cache=True,
        )
        assert self._decoder is not None
        rope_delta = int(talker.rope_deltas.reshape(-1)[0]) if attention_mask is not None else 0
        self._decoder.begin_talker(output.past_key_values, rope_delta)
        self._talker_logits = output.logits[:, -1]
        self._talker_sampler = TokenSampler(
            self._options.talker_sampling,
            self._generator,
            suppress_ids=(talker.codec_bos_token,),
            extra=(self._engine.codebook_guard,),
        )
        self._vocoder = Token2WavStream(
            model.token2wav,
            self._engine.dit_solver,
            voice=self._engine.voices[self._plan.speaker],
            max_codes=self._plan.max_audio_codes,
            generator=self._generator,
            first_chunk_codes=self._options.first_chunk_codes,
            chunk_ramp_mel=self._options.chunk_ramp_mel,
        )

    def _talker_step(self, deltas: list[Delta]) -> StepPlan:
        assert self._talker_sampler is not None and self._vocoder is not None and self._talker_logits is not None
        needed = self._talker_sampler.needs_history
        history = torch.tensor([self._talker_history if needed else self._talker_history[-1:]], device=self._device)
        code = self._talker_sampler(self._talker_logits, history)
        if code in self._engine.codec_stop_ids:
            self._finish_speech(deltas)
            return deltas
        self.codes.append(code)
        self._talker_history.append(code)
        deltas.extend(AudioDelta(pcm) for pcm in self._vocoder.push(code))
        if len(self.codes) >= self._plan.max_audio_codes:
            self._finish_speech(deltas)
            return deltas
        yield from self._advance_thinker(deltas)
        step = len(self.codes)
        reply = self._replies[step] if step < len(self._replies) else self._tts_embedding("pad")
        assert self._decoder is not None
        self._talker_logits = yield self._decoder.call("talker", code, reply)
        return deltas

    def _finish_speech(self, deltas: list[Delta]) -> None:
        assert self._vocoder is not None
        deltas.extend(AudioDelta(pcm) for pcm in self._vocoder.flush())
        self._talker_done = True
        if self._decoder is not None:
            self._decoder.end_talker()
        self._talker_logits = None
        self._replies = []
        self._vocoder = None

    def _tts_embedding(self, which: str) -> torch.Tensor:
        if self._tts_eos is None or self._tts_pad is None:
            talker = self._model.talker
            ids = torch.tensor([talker.text_eos_token, talker.text_pad_token], device=self._device)
            self._tts_eos, self._tts_pad = self._model.thinker.get_input_embeddings()(ids).split(1)
        return self._tts_eos if which == "eos" else self._tts_pad


def step_generations(generations: Sequence[Qwen25Generation]) -> list[list[Delta] | BaseException]:
    """One step of every generation, their decode calls batched per runner (all slot sessions together)."""
    with torch.inference_mode():
        return run_steps([generation.plan_step() for generation in generations], DECODE_ORDER)


class CodebookGuard:
    """Keeps the talker on ids token2wav can embed (the codebook) plus its stop ids. A trained talker stays there by
    itself; an untrained or unlucky one would otherwise crash the vocoder with an index error."""

    def __init__(self, codebook_size: int, stop_ids: tuple[int, ...]) -> None:
        self._codebook_size = codebook_size
        self._stop_ids = list(stop_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kept = scores[..., self._stop_ids].clone()
        scores[..., self._codebook_size :] = -float("inf")
        scores[..., self._stop_ids] = kept
        return scores


# ---------------------------------------------------------------------------------------------- the engine
class Qwen25OmniEngine(QwenOmniEngine):
    """Qwen2.5-Omni 3B/7B (or any local checkpoint of that architecture) streamed through one GPU worker."""

    name = ENGINE_NAME
    _model: Qwen2_5OmniForConditionalGeneration | None

    def __init__(self, model: str = DEFAULT_MODEL, **options: Any) -> None:
        self.options = options_from_mapping(Qwen25OmniOptions, options, engine=ENGINE_NAME)
        super().__init__(model, self.options)
        for switch in ("cuda_graphs", "dit_cuda_graph"):
            if getattr(self.options, switch) and self.runtime.device.type != "cuda":
                raise EngineError(
                    f"{ENGINE_NAME}: {switch} needs a CUDA device, the engine runs on {self.runtime.device}"
                )
        self._dit_solver: DitSolver | None = None
        self.voices: dict[str, Voice] = {}
        """Each speaker's DiT conditioning, computed once when the model is installed."""
        self.codec_stop_ids: tuple[int, ...] = ()
        self.codebook_guard: CodebookGuard | None = None

    @property
    def dit_solver(self) -> DitSolver:
        if self._dit_solver is None:
            raise EngineError(f"{ENGINE_NAME}: audio output is not loaded")
        return self._dit_solver

    @property
    def speakers(self) -> list[str]:
        return list(self.model.speaker_map)

    def load(self) -> None:
        self.install(*self.load_weights())

    def load_weights(self) -> tuple[Qwen2_5OmniForConditionalGeneration, PreTrainedTokenizerBase]:
        """The checkpoint and its tokenizer through `from_pretrained` (benchmarks override this with random weights)."""
        model = load_pretrained(
            Qwen2_5OmniForConditionalGeneration,
            self.model_id,
            self.runtime,
            engine=ENGINE_NAME,
            extra_files=("spk_dict.pt",),  # the voices; from_pretrained insists on it even for text-only use
        )
        tokenizer = load_tokenizer(self.model_id, engine=ENGINE_NAME)
        return model, tokenizer

    def install(self, model: Qwen2_5OmniForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
        """Check a loaded model against the options and derive the per-model constants every request uses."""
        if self.options.enable_audio:
            model.token2wav.float()  # a no-op for from_pretrained: it loads token2wav in float32 (enable_talker)
            cast_dit(model.token2wav.code2wav_dit_model, DTYPES[self.options.dit_dtype])
            if not model.speaker_map:
                raise EngineError(f"{ENGINE_NAME}: {self.model_id!r} has no speakers (spk_dict.pt is empty)")
            if self.options.voice not in model.speaker_map:
                raise EngineError(
                    f"{ENGINE_NAME}: voice {self.options.voice!r} is not a speaker of {self.model_id!r} "
                    f"(available: {sorted(model.speaker_map)})"
                )
            windows = Token2WavStream.regular_windows(self.options.first_chunk_codes, self.options.chunk_ramp_mel)
            self._dit_solver = DitSolver(
                model.token2wav.code2wav_dit_model,
                steps=self.options.dit_steps,
                fixed_lengths=windows if self.options.dit_cuda_graph else (),
                graphs=self.options.dit_cuda_graph,
            )
            self.voices = {
                name: self._dit_solver.voice(
                    speaker["cond"].to(self.runtime.device), speaker["ref_mel"].to(self.runtime.device)
                )
                for name, speaker in model.speaker_map.items()
            }
            talker = model.talker
            self.codec_stop_ids = (talker.codec_pad_token, talker.codec_eos_token)
            codebook = model.config.token2wav_config.dit_config.num_embeds
            self.codebook_guard = CodebookGuard(codebook, self.codec_stop_ids)
        else:
            model.disable_talker()
        eos = {tokenizer.convert_tokens_to_ids(token) for token in TEXT_EOS_TOKENS}
        configured = model.thinker.generation_config.eos_token_id
        eos |= set(configured if isinstance(configured, list) else [] if configured is None else [configured])
        self.text_eos_ids = frozenset(token for token in eos if token is not None and token >= 0)
        self.default_text_sampling = Sampling.from_generation_config(model.thinker.generation_config)
        self._prompts = PromptBuilder(
            tokenizer,
            prompt_format(model.config.thinker_config.vision_config),
            system_prompt=self.options.system_prompt,
            instructions_turn=self.options.instructions_turn,
        )
        self._tokenizer, self._model = tokenizer, model
        self.context_tokens = model.config.thinker_config.text_config.max_position_embeddings
        if self.options.dit_cuda_graph:
            self._prewarm_dit()
        if self.options.static_cache:
            self.slots = Qwen25SlotPool(
                model,
                slots=self.max_active,
                thinker_tokens=self.options.static_cache_tokens,
                talker_tokens=self.options.static_cache_tokens + self.options.max_audio_codes + 2,
                dtype=self.runtime.dtype,
                device=self.runtime.device,
                graphs=self.options.cuda_graphs,
            )
            self._prewarm_slots()
        log.info(
            "%s: loaded %s (%s parameters, audio %s, speakers %s)",
            ENGINE_NAME,
            self.model_id,
            f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B",
            "on" if self.audio_enabled else "off",
            sorted(model.speaker_map) if self.audio_enabled else [],
        )

    def growing_caches(self) -> EagerDecoder:
        return EagerDecoder(self.model)

    def step_batch(self) -> StepBatch:
        return step_generations  # type: ignore[return-value]

    @torch.inference_mode()  # as the vocoder runs in a step: no autograd records inside the graphs
    def _prewarm_dit(self) -> None:
        """Capture the DiT graphs of the regular windows (which every voice shares) before any caller."""
        dit = self.model.token2wav.code2wav_dit_model
        device = self.runtime.device
        voice = next(iter(self.voices.values()))
        for length in Token2WavStream.regular_windows(self.options.first_chunk_codes, self.options.chunk_ramp_mel):
            self.dit_solver.solve(
                torch.zeros(1, length, dit.mel_dim, device=device),
                torch.zeros(1, length // Token2WavStream.MEL_PER_CODE, dtype=torch.long, device=device),
                voice,
            )

    def _prewarm_slots(self) -> None:
        """Run a short answer on every slot at once, so first-call costs are paid before any caller."""
        assert self.slots is not None
        silence = ResponseRequest(
            messages=(Message("user", (AudioPart(np.zeros(INPUT_RATE, dtype=np.float32)),)),),
            sampling=SamplingParams(temperature=0.0, max_tokens=3, seed=0),
        )
        plan = replace(self.prepare(silence), max_audio_codes=3)
        generations = [Qwen25Generation(self, plan) for _ in range(self.slots.thinker.free_slots)]
        while live := [generation for generation in generations if not generation.finished]:
            for result in step_generations(live):
                if isinstance(result, BaseException):
                    raise result
        log.info("%s: %d decode slots ready (graphs: %s)", ENGINE_NAME, len(generations), self.options.cuda_graphs)

    def unload(self) -> None:
        self.slots = None
        self._dit_solver = None
        self.voices = {}
        self._model = None
        self._tokenizer = None
        self._prompts = None

    def prepare(self, request: ResponseRequest) -> TurnPlan:
        if self._prompts is None:
            raise EngineError(f"{ENGINE_NAME}: the model is not loaded")
        sampling = request.sampling
        forced, suppressed = self._prompts.tool_choice_tokens(request)
        return TurnPlan(
            inputs=self._prompts.build(request),
            speaker=resolve_speaker(request.voice, self.speakers, self.options.voice) if self.audio_enabled else "",
            text_sampling=self.default_text_sampling.overridden(
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
            ),
            max_text_tokens=sampling.max_tokens or self.options.max_text_tokens,
            output_audio=request.output_audio,
            seed=sampling.seed,
            max_audio_codes=self.options.max_audio_codes,
            request_id=request.request_id,
            conversation_id=request.conversation_id,
            stop=sampling.stop,
            tools=request.tools_enabled,
            forced_ids=forced,
            suppressed_ids=suppressed,
        )

    def make_generation(self, prepared: TurnPlan) -> Qwen25Generation:
        return Qwen25Generation(self, prepared)
