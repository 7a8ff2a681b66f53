"""What the Qwen-Omni engines share: settings resolution, loading, prompt building, sampling and the engine shell.

Both model families take the same kind of input (a ChatML conversation whose audio turns are Whisper log-mel
features), load through `from_pretrained`, sample with the usual warpers and run on one `GpuWorker`. Each engine
module only supplies how one request's thinker -> talker -> vocoder loop advances (`make_generation`).

The multimodal processor classes of transformers cannot be built without torchvision (their video part), so the
prompt and the audio features are built here by hand, the way the processors do it.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import importlib.util
import json
import logging
import math
import os
import secrets
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    WhisperFeatureExtractor,
)

from omnivox.pipeline import media
from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioPart,
    Delta,
    EngineError,
    EngineNotReady,
    ImagePart,
    InvalidRequest,
    InvalidSampling,
    Message,
    ResponseRequest,
    SamplingParams,
    TextDelta,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    check_prompt_budget,
    checked_sampling,
    cut_at_stop,
)
from omnivox.pipeline.engines.prefix_cache import EncodedPrompt, PrefixStore, encode_prompt
from omnivox.pipeline.engines.scheduler import Generation, GpuWorker, StepBatch
from omnivox.pipeline.engines.slots import Decoder, GrowingCaches, SlotPool, SlotSeats
from omnivox.pipeline.engines.tool_calls import (
    CALL_START,
    RESULT_END,
    ToolCallParser,
    call_text,
    forced_call_prefix,
    result_text,
    tool_specs,
    tools_system_text,
)

log = logging.getLogger(__name__)

OUTPUT_RATE = 24_000
"""Both Qwen-Omni vocoders produce 24 kHz mono."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

OPENAI_VOICE_TO_SPEAKER: Mapping[str, str] = {
    "alloy": "Chelsie",
    "ash": "Ethan",
    "ballad": "Ethan",
    "coral": "Chelsie",
    "echo": "Ethan",
    "fable": "Ethan",
    "nova": "Chelsie",
    "onyx": "Ethan",
    "sage": "Chelsie",
    "shimmer": "Chelsie",
    "verse": "Ethan",
    "marin": "Chelsie",
    "cedar": "Ethan",
}
"""OpenAI voice names -> Qwen-Omni speakers, by the voice's register: the lighter voices become Chelsie (female),
the deeper ones Ethan (male). A request may also name a model speaker directly ("Chelsie", "Ethan", "Aiden")."""


# ---------------------------------------------------------------------------------------------- settings resolution
def resolve_device(setting: str, *, engine: str) -> torch.device:
    """`auto` is the first CUDA GPU when there is one, else the CPU; asking for CUDA without one is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise EngineError(f"{engine}: device must be auto, cpu or cuda[:N], got {setting!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(
                f"{engine}: device is {setting!r} but no CUDA GPU is available "
                "(set engine.options device: auto or cpu, or run on a machine with a GPU)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EngineError(
                f"{engine}: device {setting!r} does not exist ({torch.cuda.device_count()} CUDA device(s) found)"
            )
    elif device.type != "cpu":
        raise EngineError(f"{engine}: device must be auto, cpu or cuda[:N], got {setting!r}")
    return device


def resolve_dtype(setting: str, device: torch.device, *, engine: str) -> torch.dtype:
    """`auto` is bfloat16 on CUDA (the checkpoints' dtype) and float32 on the CPU (bf16 matmuls are slow there)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting not in DTYPES:
        raise EngineError(f"{engine}: dtype must be one of {['auto', *DTYPES]}, got {setting!r}")
    return DTYPES[setting]


def resolve_attention(
    setting: str, device: torch.device, dtype: torch.dtype, *, engine: str, own_masks: Sequence[str] = ()
) -> str:
    """`auto` is FlashAttention 2 when it is installed and usable (CUDA, half precision), else PyTorch SDPA.

    `own_masks` names the switched-on options whose decode paths pass their own 4-D attention masks (the slot
    steps, the unrolled code predictor). FlashAttention 2 reads such a mask as a 2-D padding mask (and reads it back
    to the host, which a CUDA graph cannot hold), so with any of them `auto` is SDPA and an explicit
    flash_attention_2 is refused. SDPA and eager read the masks correctly (eager gets additive masks).
    """
    if setting not in ATTENTION_IMPLEMENTATIONS:
        raise EngineError(f"{engine}: attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {setting!r}")
    flash_usable = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    if setting == "auto":
        return "flash_attention_2" if flash_usable and flash_installed and not own_masks else "sdpa"
    if setting == "flash_attention_2" and own_masks:
        raise EngineError(
            f"{engine}: attn_implementation flash_attention_2 cannot read the attention masks that "
            f"{' and '.join(own_masks)} pass(es); set attn_implementation: sdpa (or auto), or turn "
            f"{' and '.join(own_masks)} off"
        )
    if setting == "flash_attention_2" and not (flash_usable and flash_installed):
        raise EngineError(
            f"{engine}: attn_implementation flash_attention_2 needs the flash-attn package, a CUDA device and "
            f"dtype bfloat16/float16 (installed: {flash_installed}, device: {device}, dtype: {dtype})"
        )
    return setting


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs, resolved from the `device`, `dtype` and `attn_implementation` options."""

    device: torch.device
    dtype: torch.dtype
    attn_implementation: str

    @classmethod
    def resolve(
        cls, *, device: str, dtype: str, attn_implementation: str, engine: str, own_masks: Sequence[str] = ()
    ) -> Runtime:
        resolved_device = resolve_device(device, engine=engine)
        resolved_dtype = resolve_dtype(dtype, resolved_device, engine=engine)
        attention = resolve_attention(
            attn_implementation, resolved_device, resolved_dtype, engine=engine, own_masks=own_masks
        )
        return cls(resolved_device, resolved_dtype, attention)


OptionsT = TypeVar("OptionsT")


def options_from_mapping(options_class: type[OptionsT], options: Mapping[str, Any], *, engine: str) -> OptionsT:
    """Build an options dataclass from the YAML `engine.options` mapping; an unknown key is an error."""
    known = {field.name for field in fields(options_class)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise EngineError(f"{engine}: unknown engine option(s) {unknown}; known: {sorted(known)}")
    try:
        return options_class(**options)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"{engine}: invalid engine options: {exc}") from exc


# ---------------------------------------------------------------------------------------------- loading
def check_local_checkpoint(path: Path, *, engine: str, extra_files: Sequence[str] = ()) -> None:
    """Fail early, naming the path, when a local checkpoint directory lacks its config, weights or shards."""
    if not path.is_dir():
        raise EngineError(f"{engine}: model path {str(path)!r} is not a directory")
    missing = [name for name in ("config.json", *extra_files) if not (path / name).is_file()]
    index = next((path / name for name in WEIGHT_INDEX_FILES if (path / name).is_file()), None)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [shard for shard in shards if not (path / shard).is_file()]
    elif not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"weights ({' or '.join(WEIGHT_FILES)})")
    if missing:
        raise EngineError(f"{engine}: model directory {str(path)!r} is incomplete, missing: {', '.join(missing)}")


ModelT = TypeVar("ModelT", bound=PreTrainedModel)


def load_pretrained(
    model_class: type[ModelT],
    model: str,
    runtime: Runtime,
    *,
    engine: str,
    extra_files: Sequence[str] = (),
    **kwargs: Any,
) -> ModelT:
    """`from_pretrained` on a hub id (downloaded into `HF_HOME`) or a local directory, with progress bars shown.

    Any failure to find or read the weights becomes an `EngineError` that names the model and where it was looked for.
    """
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    enable_progress_bars()
    transformers_logging.enable_progress_bar()
    local = Path(model).expanduser()
    if local.exists() or model.startswith((".", "/", "~")):
        check_local_checkpoint(local, engine=engine, extra_files=extra_files)
        source = str(local)
    else:
        source = model
    log.info(
        "%s: loading %s on %s (%s, attention %s; HF_HOME=%s)",
        engine,
        source,
        runtime.device,
        runtime.dtype,
        runtime.attn_implementation,
        os.environ.get("HF_HOME", "~/.cache/huggingface"),
    )
    try:
        loaded = model_class.from_pretrained(
            source,
            dtype=runtime.dtype,
            attn_implementation=runtime.attn_implementation,
            device_map=str(runtime.device) if runtime.device.type == "cuda" else None,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"{engine}: could not load model {model!r} (hub id or local directory; downloads go to "
            f"HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}): {exc}"
        ) from exc
    return loaded.to(runtime.device).eval()


def load_tokenizer(model: str, *, engine: str) -> PreTrainedTokenizerBase:
    source = str(Path(model).expanduser()) if Path(model).expanduser().exists() else model
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise EngineError(f"{engine}: could not load the tokenizer of {model!r}: {exc}") from exc


def device_failure(device: torch.device) -> str | None:
    """None while `device` still runs work, else the error it raises. A CUDA error such as a device-side assert is
    sticky: every later call on the context fails with it, and only a new process recovers."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).cpu()
    except Exception as exc:  # any failure here means the context is unusable
        return f"{type(exc).__name__}: {exc}"
    return None


def free_accelerator_memory() -> None:
    """Return cached blocks to the driver (after an out-of-memory error or when a model is dropped)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- prompt building
def check_audio_is_finite(request: ResponseRequest) -> None:
    """Refuse audio with NaN or infinite samples (a float WAV can carry them): they would turn the audio features,
    and with them the logits and the sampling probabilities, into NaN."""
    for message in request.messages:
        for part in message.parts:
            if isinstance(part, AudioPart) and part.pcm.size and not np.isfinite(part.pcm).all():
                raise InvalidRequest("the audio contains NaN or infinite samples")


@dataclass(frozen=True)
class PromptFormat:
    """How one model family spells multimodal placeholders in its ChatML prompt."""

    audio_start: str
    audio_placeholder: str
    audio_end: str
    audio_tokens: Callable[[int], int]
    """Number of audio placeholder tokens for an input of n feature frames (10 ms each)."""
    audio_zero_padded: bool = True
    """How the family's processor extracts a clip's log-mel features. True (Qwen2.5): as the start of a 30 s window
    of silence, ceil(N/160) frames. False (Qwen3, whose processor pads only to the longest clip): as the clip alone,
    floor(N/160) frames, the STFT reflecting at its end."""
    max_audio_seconds: float | None = None
    """The longest clip the processor keeps (Qwen2.5's truncates at 30 s); a longer audio part becomes consecutive
    clips of at most this length, each an audio segment of its own, so nothing the caller said is dropped."""
    image: ImageFormat | None = None
    """How images are cut into vision patches; None leaves image parts out (with a warning)."""


@dataclass(frozen=True)
class ImageFormat:
    """The Qwen2-VL style image preprocessing of a vision encoder (what its image processor does).

    The image is resized so both sides are multiples of `patch_size * merge_size` and its area lies within
    [min_pixels, max_pixels], normalised, repeated `temporal_patch_size` times (a still image is a 1-frame video)
    and flattened into patches; every `merge_size**2` patches become one placeholder token. `max_pixels` bounds the
    prefill cost: the default (about 1 MP) is 1280 tokens at most.
    """

    start: str
    placeholder: str
    end: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """Qwen2-VL's `smart_resize`: nearest multiples of the patch grid, area scaled into bounds."""
        factor = self.patch_size * self.merge_size
        if max(height, width) / min(height, width) > 200:
            raise EngineError(f"image aspect ratio {width}x{height} is too extreme (at most 200:1)")
        new_height = max(factor, round(height / factor) * factor)
        new_width = max(factor, round(width / factor) * factor)
        if new_height * new_width > self.max_pixels:
            scale = math.sqrt(height * width / self.max_pixels)
            new_height = max(factor, math.floor(height / scale / factor) * factor)
            new_width = max(factor, math.floor(width / scale / factor) * factor)
        elif new_height * new_width < self.min_pixels:
            scale = math.sqrt(self.min_pixels / (height * width))
            new_height = math.ceil(height * scale / factor) * factor
            new_width = math.ceil(width * scale / factor) * factor
        return new_height, new_width

    def patches(self, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """`[H, W, 3]` uint8 -> (`[patches, 3 * T * P * P]` float32 pixel values, `[1, 3]` grid (t, h, w))."""
        height, width = self.resized(rgb.shape[0], rgb.shape[1])
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
        image = torch.nn.functional.interpolate(
            image, size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
        image = image.clamp(0, 255).round() / 255
        image = (image - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        frames = image.repeat(self.temporal_patch_size, 1, 1, 1)  # [T, C, H, W]
        patch, merge = self.patch_size, self.merge_size
        grid_h, grid_w = height // patch, width // patch
        patches = frames.reshape(
            1, self.temporal_patch_size, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch
        )
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(grid_h * grid_w, 3 * self.temporal_patch_size * patch * patch)
        return flat, torch.tensor([[1, grid_h, grid_w]])

    def tokens(self, grid: torch.Tensor) -> int:
        return int(grid.prod()) // self.merge_size**2


def decode_image(part: ImagePart) -> np.ndarray:
    """Image bytes -> `[H, W, 3]` uint8 RGB with `media.decode_image` (PyAV, already a server dependency, unlike PIL;
    its decoder alone, no demuxer, bounded by the dimensions of the header the door checked)."""
    try:
        return media.decode_image(part.data)
    except media.MediaError as exc:
        raise EngineError(f"could not decode an image part ({part.mime_type}, {len(part.data)} bytes): {exc}") from None


def qwen2_5_audio_tokens(feature_frames: int) -> int:
    """Qwen2.5-Omni's audio encoder halves the frame rate twice (100 Hz mel -> 25 Hz tokens)."""
    return ((feature_frames - 1) // 2 + 1 - 2) // 2 + 1


@dataclass(frozen=True)
class ModelInputs:
    """The thinker's inputs for one turn, on the CPU; `tensors()` moves them to the model's device."""

    input_ids: torch.Tensor
    input_features: torch.Tensor | None
    feature_attention_mask: torch.Tensor | None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    audio_keys: tuple[str, ...] = ()
    """A content digest per audio clip, in prompt order: a prompt prefix is reusable only with the same audio."""

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        inputs = {
            "input_ids": self.input_ids.to(device),
            "attention_mask": torch.ones_like(self.input_ids, device=device),
        }
        if self.input_features is not None and self.feature_attention_mask is not None:
            inputs["input_features"] = self.input_features.to(device=device, dtype=dtype)
            inputs["feature_attention_mask"] = self.feature_attention_mask.to(device)
        if self.pixel_values is not None and self.image_grid_thw is not None:
            inputs["pixel_values"] = self.pixel_values.to(device=device, dtype=dtype)
            inputs["image_grid_thw"] = self.image_grid_thw.to(device)
        return inputs


def feature_padding(extractor: WhisperFeatureExtractor, samples: int) -> int:
    """Samples to pad audio of `samples` to: one FFT window past its end, on the hop grid (see `PromptBuilder`)."""
    hop = extractor.hop_length
    return -(-(samples + extractor.n_fft) // hop) * hop


INSTRUCTIONS_TURNS = ("append", "system", "user")
"""Where `PromptBuilder` puts a request's instructions when the model has a system prompt of its own."""


class PromptBuilder:
    """Turns a `ResponseRequest` into thinker inputs: one ChatML prompt plus one Whisper feature row per audio part.

    Audio parts go through `WhisperFeatureExtractor(feature_size=128)` as the family's processor does
    (`PromptFormat.audio_zero_padded`). Where the processor pads every clip to 30 s (Qwen2.5), the clips are padded
    only one FFT window past the longest instead: the valid frames are the same numbers (a frame sees half a window
    either side, the log-mel floor follows the loudest frame, which padding never is), and extracting a 4 s turn
    takes about 2 ms instead of 14 (`benchmarks/audio_features.py`), which every turn waited for. Where it pads to the
    longest clip of the request (Qwen3), each clip is extracted alone, as the processor extracts a single clip: a
    clip then keeps the same features and token count in every later turn of the conversation (in one processor
    call the shorter clips of a batch get one frame more, which is not reproduced). Parts longer than the processor
    keeps are cut into clips of that length (`PromptFormat.max_audio_seconds`).

    Image parts are decoded with PyAV and cut into vision patches by `ImageFormat` (the transformers image
    processors need PIL or torchvision, which the server does not install); a format without one leaves images out
    with a warning.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_format: PromptFormat,
        *,
        system_prompt: str,
        instructions_turn: str = "append",
    ) -> None:
        if instructions_turn not in INSTRUCTIONS_TURNS:
            raise EngineError(f"instructions_turn must be one of {INSTRUCTIONS_TURNS}, got {instructions_turn!r}")
        self.tokenizer = tokenizer
        self.format = prompt_format
        self.system_prompt = system_prompt
        self.instructions_turn = instructions_turn
        self.features = WhisperFeatureExtractor(feature_size=128, sampling_rate=INPUT_RATE)

    def opening_turns(self, instructions: str) -> list[tuple[str, str]]:
        """The turns before the conversation: the model's own system prompt and the caller's instructions.

        With no system prompt the instructions are the system turn. Otherwise `instructions_turn` says where they go:
        appended to the system prompt ("append"), or in a system turn of their own after it ("system"), which keeps
        the first turn byte for byte the model's prompt. "user" puts them at the head of the first user turn instead
        (`_with_instructions`), so no turn is added here.
        """
        instructions = instructions.strip()
        if not self.system_prompt:
            return [("system", instructions)] if instructions else []
        if not instructions or self.instructions_turn == "user":
            return [("system", self.system_prompt)]
        if self.instructions_turn == "system":
            return [("system", self.system_prompt), ("system", instructions)]
        return [("system", f"{self.system_prompt}\n\n{instructions}")]

    def _with_instructions(self, turns: list[tuple[str, str]], instructions: str) -> list[tuple[str, str]]:
        """The conversation with the instructions at the head of its first user turn (a user turn of their own when
        there is none yet), for `instructions_turn: user`."""
        instructions = instructions.strip()
        if self.instructions_turn != "user" or not self.system_prompt or not instructions:
            return turns
        first_user = next((index for index, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            return [*turns, ("user", instructions)]
        role, text = turns[first_user]
        return [*turns[:first_user], (role, f"{instructions}\n\n{text}"), *turns[first_user + 1 :]]

    @property
    def template_has_tools(self) -> bool:
        """The tokenizer's chat template renders tools itself (Qwen3-Omni's does; Qwen2.5-Omni's does not)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return isinstance(template, str) and "tools" in template

    def build(self, request: ResponseRequest) -> ModelInputs:
        audio: list[np.ndarray] = []
        images: list[tuple[torch.Tensor, torch.Tensor]] = []
        prompt = self._prompt_text(request, audio, images)
        features = mask = None
        if audio:
            features, mask = self._audio_features(audio)
            counts = [self.format.audio_tokens(int(length)) for length in mask.sum(-1).tolist()]
            prompt = _fill_slots(prompt, _AUDIO_SLOT, self.format.audio_placeholder, counts)
        pixel_values = grid = None
        if images and self.format.image is not None:
            pixel_values = torch.cat([patches for patches, _ in images])
            grid = torch.cat([image_grid for _, image_grid in images])
            counts = [self.format.image.tokens(image_grid) for _, image_grid in images]
            prompt = _fill_slots(prompt, _IMAGE_SLOT, self.format.image.placeholder, counts)
        input_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        return ModelInputs(
            input_ids=input_ids,
            input_features=features,
            feature_attention_mask=mask,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            audio_keys=tuple(hashlib.blake2b(clip.tobytes(), digest_size=16).hexdigest() for clip in audio),
        )

    def _prompt_text(
        self, request: ResponseRequest, audio: list[np.ndarray], images: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> str:
        """The ChatML prompt. Function calls and results in the conversation, and the tools on offer, go through the
        model's chat template where it renders tools, else in the Hermes format (`tool_calls`)."""
        opening = self.opening_turns(request.instructions)
        with_tools = request.tools_enabled or any(
            isinstance(part, ToolCallPart | ToolResultPart) for message in request.messages for part in message.parts
        )
        if with_tools and self.template_has_tools:
            return self._templated_prompt(request, opening, audio, images)
        if request.tools_enabled:
            opening = self._with_tool_offer(opening, tools_system_text(request.tools, request.tool_choice))
        conversation: list[tuple[str, str]] = []
        for message in request.messages:
            text = self._message_text(message, audio, images)
            if message.role != "tool":
                conversation.append((message.role, text))
            elif conversation and conversation[-1][0] == "user" and conversation[-1][1].endswith(RESULT_END):
                conversation[-1] = ("user", f"{conversation[-1][1]}\n{text}")  # one turn's call results, together
            else:
                conversation.append(("user", text))
        turns = opening + self._with_instructions(conversation, request.instructions)
        return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"

    def _with_tool_offer(self, opening: list[tuple[str, str]], offer: str) -> list[tuple[str, str]]:
        """The tools on offer in the last system turn before the conversation, except the model's own prompt, which
        stays the first turn byte for byte (speech needs it): then they get a system turn of their own."""
        if not opening or opening[-1][1] == self.system_prompt:
            return [*opening, ("system", offer)]
        role, text = opening[-1]
        return [*opening[:-1], (role, f"{text}\n\n{offer}")]

    def _templated_prompt(
        self,
        request: ResponseRequest,
        opening: list[tuple[str, str]],
        audio: list[np.ndarray],
        images: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> str:
        conversation: list[dict[str, Any]] = [{"role": role, "content": text} for role, text in opening]
        for message in request.messages:
            if message.role == "tool":
                outputs = [part.output for part in message.parts if isinstance(part, ToolResultPart)]
                conversation.append({"role": "tool", "content": "\n".join(outputs)})
                continue
            calls = [part for part in message.parts if isinstance(part, ToolCallPart)]
            spoken = Message(message.role, tuple(part for part in message.parts if not isinstance(part, ToolCallPart)))
            entry: dict[str, Any] = {"role": message.role, "content": self._message_text(spoken, audio, images)}
            if calls:
                entry["tool_calls"] = [
                    {"type": "function", "function": {"name": call.name, "arguments": _json_or_text(call.arguments)}}
                    for call in calls
                ]
            conversation.append(entry)
        return self.tokenizer.apply_chat_template(
            conversation,
            tools=tool_specs(request.tools) if request.tools_enabled else None,
            tokenize=False,
            add_generation_prompt=True,
        )

    def tool_choice_tokens(self, request: ResponseRequest) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(tokens the answer must begin with, tokens it must never contain) for the request's tool choice:
        `required` or a named function starts the answer with a call; `none` forbids the call token."""
        if not request.tools:
            return (), ()
        if request.tool_choice.mode == "none":
            token = self.tokenizer.convert_tokens_to_ids(CALL_START)
            single = isinstance(token, int) and token != self.tokenizer.unk_token_id
            return (), ((token,) if single else ())
        prefix = forced_call_prefix(request.tool_choice)
        ids = self.tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
        return tuple(ids), ()

    def _message_text(
        self, message: Message, audio: list[np.ndarray], images: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> str:
        texts = []
        calls = []
        for part in message.parts:
            if isinstance(part, ToolCallPart):
                calls.append(call_text(part))
            elif isinstance(part, ToolResultPart):
                texts.append(result_text(part))
            elif isinstance(part, TextPart):
                texts.append(part.text.replace("\x00", ""))  # NUL delimits the placeholder slots
            elif isinstance(part, AudioPart):
                if message.role != "user":
                    continue  # assistant audio is represented by its transcript
                for clip in self._clips(np.asarray(part.pcm, dtype=np.float32).reshape(-1)):
                    audio.append(clip)
                    texts.append(f"{self.format.audio_start}{_AUDIO_SLOT}{self.format.audio_end}")
            elif isinstance(part, ImagePart):
                image_format = self.format.image
                if image_format is None:
                    log.warning("this model takes no image input; an image part was left out")
                    continue
                images.append(image_format.patches(decode_image(part)))
                texts.append(f"{image_format.start}{_IMAGE_SLOT}{image_format.end}")
        text = "".join(texts)
        return "\n".join([text, *calls] if text else calls) if calls else text

    def _clips(self, pcm: np.ndarray) -> list[np.ndarray]:
        """An audio part as the clips the processor takes (none when it is empty)."""
        seconds = self.format.max_audio_seconds
        longest = pcm.size if seconds is None else int(seconds * INPUT_RATE)
        return [pcm[start : start + longest] for start in range(0, pcm.size, longest)]

    def _audio_features(self, audio: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.format.audio_zero_padded:
            return self._features_clip_by_clip(audio)
        padded_samples = feature_padding(self.features, max(len(clip) for clip in audio))
        if self.format.max_audio_seconds is not None:  # a clip of the full length is, as there, not padded at all
            padded_samples = min(padded_samples, int(self.format.max_audio_seconds * INPUT_RATE))
        extracted = self.features(
            audio,
            sampling_rate=INPUT_RATE,
            padding="max_length",
            max_length=padded_samples,
            truncation=False,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return extracted["input_features"], extracted["attention_mask"]

    def _features_clip_by_clip(self, audio: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each clip's features as the extractor makes them for that clip alone, stacked with zero padding. A clip
        shorter than one FFT window (25 ms) is first padded to one with silence (the STFT needs that much)."""
        rows = [
            self.features(
                np.pad(clip, (0, max(0, self.features.n_fft - clip.size))),
                sampling_rate=INPUT_RATE,
                padding="longest",
                truncation=False,
                return_tensors="pt",
            )["input_features"][0]
            for clip in audio
        ]
        frames = max(row.shape[-1] for row in rows)
        features = torch.zeros(len(rows), rows[0].shape[0], frames)
        mask = torch.zeros(len(rows), frames, dtype=torch.int32)
        for index, row in enumerate(rows):
            features[index, :, : row.shape[-1]] = row
            mask[index, : row.shape[-1]] = 1
        return features, mask


def _json_or_text(arguments: str) -> Any:
    """Call arguments as chat templates take them: the JSON value, or the text when it is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


_AUDIO_SLOT = "\x00audio\x00"
_IMAGE_SLOT = "\x00image\x00"
"""Mark where a part's placeholder tokens go until their count is known."""


def _fill_slots(prompt: str, slot: str, placeholder: str, counts: list[int]) -> str:
    pieces = prompt.split(slot)
    return pieces[0] + "".join(placeholder * count + piece for count, piece in zip(counts, pieces[1:], strict=True))


class IncrementalText:
    """Decodes token ids one at a time into text deltas without splitting multi-byte characters, and ends the text
    before the first of the request's stop strings (OpenAI `stop`: the stop string itself is not returned).

    Byte-level BPE tokens concatenate as bytes, so only the ids since the last complete character are decoded:
    a delta whose decoding ends in U+FFFD (an incomplete UTF-8 sequence) waits for the next token, but never for
    more than `MAX_HELD_TOKENS` tokens (a UTF-8 character has at most 4 bytes: beyond that the bytes are invalid).
    Text that could be the beginning of a stop string is held back until the next tokens decide.
    """

    MAX_HELD_TOKENS = 4

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._pending: list[int] = []
        self._stops = tuple(stops)
        self._held = ""
        self.stopped = False
        """True once a stop string appeared: the answer must end here."""

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now complete (possibly empty)."""
        self._pending.append(token_id)
        return self._take(final=False)

    def flush(self) -> str:
        """Whatever is still held back, decoded as it is (end of the answer)."""
        return self._take(final=True)

    def _take(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        decoded = self._tokenizer.decode(self._pending, skip_special_tokens=True)
        if decoded.endswith("\ufffd") and not final and len(self._pending) < self.MAX_HELD_TOKENS:
            return ""
        self._pending = []
        text, self.stopped = cut_at_stop(self._held + decoded, self._stops)
        if self.stopped:
            self._held = ""
            return text
        held = (
            0
            if final
            else max(
                (size for stop in self._stops for size in range(1, len(stop)) if text.endswith(stop[:size])),
                default=0,
            )
        )
        self._held = text[len(text) - held :]
        return text[: len(text) - held]


class AnswerText:
    """The thinker's tokens as a response's deltas: decoded incrementally (stop strings honoured) and, when the
    request offers tools, split into speech and function calls (`ToolCallParser`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] = (), *, tools: bool = False) -> None:
        self._text = IncrementalText(tokenizer, stops)
        self._calls = ToolCallParser() if tools else None

    @property
    def stopped(self) -> bool:
        return self._text.stopped

    @property
    def in_call(self) -> bool:
        """A function call has begun: no text from here on is speech, so the talker must hear no more."""
        return self._calls is not None and self._calls.in_call

    def push(self, token_id: int) -> list[Delta]:
        return self._split(self._text.push(token_id))

    def flush(self) -> list[Delta]:
        """The end of the answer: held text, and a call left open."""
        deltas = self._split(self._text.flush())
        return deltas + self._calls.finish() if self._calls is not None else deltas

    def _split(self, text: str) -> list[Delta]:
        if self._calls is not None:
            return self._calls.push(text)
        return [TextDelta(text)] if text else []


# ---------------------------------------------------------------------------------------------- sampling
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
"""The generation-config fields the samplers honour; others that change sampling are named in a warning at load."""
UNSUPPORTED_SAMPLING_FIELDS = ("min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "no_repeat_ngram_size")


@dataclass(frozen=True)
class Sampling:
    """One stage's sampling parameters. Greedy when `do_sample` is off or the temperature is 0."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = True

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0

    @classmethod
    def from_generation_config(cls, config: Any) -> Sampling:
        """What `generate()` starts from: the checkpoint's `generation_config`, then transformers' global defaults for
        whatever it leaves unset (top_k 50, temperature 1, top_p 1, greedy), as `_prepare_generation_config` does."""
        defaults = GenerationConfig._get_default_generation_params()
        values = {}
        for name in SAMPLING_FIELDS:
            value = getattr(config, name, None)
            values[name] = defaults[name] if value is None else value
        ignored = [name for name in UNSUPPORTED_SAMPLING_FIELDS if getattr(config, name, None) not in (None, 0, 1.0)]
        if ignored and values["do_sample"]:
            log.warning("the checkpoint's generation config sets %s, which this engine does not apply", ignored)
        return cls(
            temperature=float(values["temperature"]),
            top_k=int(values["top_k"]),
            top_p=float(values["top_p"]),
            repetition_penalty=float(values["repetition_penalty"]),
            do_sample=bool(values["do_sample"]),
        )

    def overridden(self, *, temperature: float | None, top_k: int | None, top_p: float | None) -> Sampling:
        """These parameters with a request's overrides (None keeps the default), checked as every door checks them.

        A request temperature is OpenAI's switch between greedy (0) and sampling (> 0), i.e. `generate()`'s
        `do_sample`; the top-k and top-p of the checkpoint (or transformers' defaults) then apply unless the request
        sets its own.
        """
        try:
            checked = checked_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        except InvalidSampling as exc:
            raise InvalidRequest(str(exc)) from None
        return Sampling(
            temperature=self.temperature if checked.temperature is None else checked.temperature,
            top_k=self.top_k if checked.top_k is None else checked.top_k,
            top_p=self.top_p if checked.top_p is None else checked.top_p,
            repetition_penalty=self.repetition_penalty,
            do_sample=self.do_sample if checked.temperature is None else checked.temperature > 0,
        )


def sampling_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """`[rows, vocab]` scores -> probabilities `torch.multinomial` always accepts (finite, >= 0, a positive sum).

    NaN scores count as excluded and +inf as the largest score; a row with nothing left becomes uniform. On CUDA a
    NaN or inf reaching `multinomial` is a device-side assert that breaks the context for every later request.
    All on the device: no host sync.
    """
    scores = torch.nan_to_num(scores.float(), nan=-float("inf"), posinf=torch.finfo(torch.float32).max)
    probabilities = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    empty = probabilities.sum(dim=-1, keepdim=True) <= 0
    return torch.where(empty, torch.ones_like(probabilities), probabilities)


class TokenSampler:
    """Draws one token per step from `[1, vocab]` logits with `generate()`'s processors and a per-request generator.

    The processors are transformers' own (repetition penalty, suppressed ids, temperature, top-k, top-p), applied in
    `generate()`'s order and under its conditions, so decoding here repeats `generate()` token for token.
    """

    def __init__(
        self,
        sampling: Sampling,
        generator: torch.Generator | None,
        *,
        suppress_ids: Sequence[int] = (),
        extra: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = (),
        forced: Sequence[int] = (),
    ) -> None:
        self.sampling = sampling
        self.generator = generator
        self._forced = list(forced)
        """Tokens handed out before sampling starts (a `required` tool choice begins the answer with a call)."""
        processors: list[Any] = []
        if sampling.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if suppress_ids:
            processors.append(_Suppress(suppress_ids))
        processors.extend(extra)
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(float(sampling.temperature)))
            if sampling.top_k != 0:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
        self.processors = LogitsProcessorList(processors)

    @property
    def needs_history(self) -> bool:
        """Whether `history` is read (only by a repetition penalty); callers may pass just the last id otherwise."""
        return self.sampling.repetition_penalty != 1.0

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        """`logits` `[1, vocab]`; `history` `[1, n]` ids so far (prompt included, as `generate()` sees them)."""
        if self._forced:
            return self._forced.pop(0)
        scores = self.processors(history.to(logits.device), logits.float())
        if self.sampling.greedy:
            return int(scores.argmax(-1))
        return int(torch.multinomial(sampling_probabilities(scores), 1, generator=self.generator))


class _Suppress:
    """`generate()`'s `suppress_tokens`, on whatever device the logits are."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self._token_ids = list(token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[..., self._token_ids] = -float("inf")
        return scores


def make_generator(seed: int | None, device: torch.device) -> tuple[torch.Generator, int]:
    """A generator for one request: seeded by the request, else by a fresh random seed (returned for logging)."""
    chosen = secrets.randbits(63) if seed is None else int(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(chosen)
    return generator, chosen


# ---------------------------------------------------------------------------------------------- voices
def resolve_speaker(voice: str, available: Sequence[str], default: str) -> str:
    """A model speaker for a request's voice: a model speaker named directly, else the OpenAI voice table, else
    the engine's default (unknown voices never fail a request)."""
    by_lower = {name.lower(): name for name in available}
    if voice.lower() in by_lower:
        return by_lower[voice.lower()]
    mapped = OPENAI_VOICE_TO_SPEAKER.get(voice.lower())
    if mapped is not None and mapped.lower() in by_lower:
        return by_lower[mapped.lower()]
    return default


# ---------------------------------------------------------------------------------------------- transcription
TRANSCRIPTION_INSTRUCTION = "Transcribe the audio into text, word for word. Reply with the transcript only."
TRANSCRIPTION_TOKENS_PER_SECOND = 8
"""Fast speech is about 4 words (5-6 tokens) a second; the bound only stops a model that keeps talking."""
TRANSCRIPTION_MIN_TOKENS = 32


def transcription_request(audio_16k: np.ndarray, language: str | None = None, prompt: str = "") -> ResponseRequest:
    """A text-only, greedy request asking the thinker for the verbatim transcript of one 16 kHz clip.

    The instruction follows the audio in the user turn (the layout of the official ASR examples); a language hint
    and the caller's prompt (names, spellings, previous context) are appended to it.
    """
    pcm = np.asarray(audio_16k, dtype=np.float32).reshape(-1)
    instruction = TRANSCRIPTION_INSTRUCTION
    if language:
        instruction += f" The speech is in the language {language!r}."
    if prompt.strip():
        instruction += f" Context that may help with names and spelling: {prompt.strip()}"
    max_tokens = max(TRANSCRIPTION_MIN_TOKENS, math.ceil(len(pcm) / INPUT_RATE * TRANSCRIPTION_TOKENS_PER_SECOND))
    return ResponseRequest(
        messages=(Message("user", (AudioPart(pcm), TextPart(instruction))),),
        output_audio=False,
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
        request_id="transcription",
    )


# ---------------------------------------------------------------------------------------------- engine shell
def text_position(value: int, device: torch.device) -> torch.Tensor:
    """`[3, 1, 1]` mrope position of one text token (text positions are equal on all three axes)."""
    return torch.full((3, 1, 1), value, dtype=torch.long, device=device)


@dataclass(frozen=True)
class EngineOptions:
    """The `engine.options` every Qwen engine has; each engine's options dataclass adds its own switches (and may set
    other defaults). Every field is one documented switch."""

    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N"."""
    dtype: str = "auto"
    """Thinker and talker weights: "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float16", "float32"."""
    attn_implementation: str = "auto"
    """"auto" (flash_attention_2 when installed and usable and no decode path builds its own masks, else sdpa),
    "sdpa", "eager", "flash_attention_2" (refused with `static_cache` or Qwen3's `cuda_graphs`)."""
    max_active: int = 4
    """Generations advanced together on the GPU worker; more requests wait in the queue."""
    max_queued: int = 16
    """Requests allowed to wait; beyond this the engine answers `server_busy`."""
    enable_audio: bool = True
    """False drops the talker and the vocoder after loading: a text-only engine."""
    max_text_tokens: int = 1024
    """Longest answer in text tokens when the request does not say (`max_tokens`)."""
    talker_temperature: float = 0.9
    """Codec sampling temperature (`generate()` default); 0 makes the talker greedy."""
    talker_repetition_penalty: float = 1.05
    prefix_cache_sessions: int = 16
    """Conversations whose last prompt stays encoded on the GPU (`prefix_cache.py`), so that their next turn
    prefills only the new part; 0 encodes every turn whole."""
    static_cache: bool = False
    """Decode the thinker and talker of `max_active` sessions on preallocated KV slots with fixed shapes
    (`slots.py`), one batched step for all, instead of a growing cache each. Same tokens (checked on CPU); costs slot
    memory up front. `benchmarks/slot_batch.py` measures what a batched step costs per session."""
    static_cache_tokens: int = 4096
    """Thinker slot length (prompt + answer); the talker slot adds the longest speech. A prompt that does not fit
    decodes that request on growing caches; an answer that outgrows its slot goes on on a growing cache of its own
    (same tokens). Both are counted in `/metrics` (`omnivox_static_cache_fallbacks_total`)."""
    stall_timeout_s: float = 30.0
    """The GPU worker's watchdog: holding work without finishing a pass this long (a hung kernel or driver) makes
    the engine unhealthy (`/healthz` 503) and fails the waiting requests instead of letting them hang."""

    def __post_init__(self) -> None:
        if self.static_cache and not self.enable_audio:
            raise ValueError("static_cache holds talker slots too: it needs enable_audio: true")
        if self.prefix_cache_sessions < 0:
            raise ValueError("prefix_cache_sessions must be >= 0")
        for name in ("max_active", "max_text_tokens", "static_cache_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be > 0")

    @property
    def own_masks(self) -> tuple[str, ...]:
        """The switched-on options whose decode paths pass their own attention masks (see `resolve_attention`)."""
        return ("static_cache",) if self.static_cache else ()


class QwenOmniEngine(ABC):
    """The Engine protocol around one model on one `GpuWorker`.

    Subclasses load their model in `load()` (on a worker thread) and turn a prepared request into a `Generation`
    in `make_generation()` (on the GPU thread). `prepare()` runs first on a thread pool, so CPU work such as feature
    extraction never stalls the other sessions' decode steps.
    """

    name: ClassVar[str]
    native_rate: ClassVar[int] = OUTPUT_RATE
    audio_tokens_per_second: ClassVar[float] = 25.0
    """What a second of caller audio costs in the thinker's prompt (the session's `truncation` estimates with it)."""

    def __init__(self, model_id: str, options: EngineOptions) -> None:
        if options.max_active < 1 or options.max_queued < 0:
            raise EngineError(f"{self.name}: max_active must be >= 1 and max_queued >= 0")
        self.model_id = model_id
        self.max_active = options.max_active
        self.max_queued = options.max_queued
        self.stall_timeout_s = options.stall_timeout_s
        self.runtime = Runtime.resolve(
            device=options.device,
            dtype=options.dtype,
            attn_implementation=options.attn_implementation,
            engine=self.name,
            own_masks=options.own_masks,
        )
        self._model: Any = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._prompts: PromptBuilder | None = None
        self.text_eos_ids: frozenset[int] = frozenset()
        self.default_text_sampling = Sampling(temperature=0.0)
        self._worker: GpuWorker | None = None
        self._ready = False
        self._start_lock = asyncio.Lock()
        self.slots: SlotPool | None = None
        """The shared decode slots, when the engine decodes its sessions as one batch (option `static_cache`)."""
        self.prefixes = PrefixStore(options.prefix_cache_sessions)
        """Each conversation's last prompt, encoded."""
        self.static_cache_fallbacks: Counter[str] = Counter()
        """Why sequences decoded on growing caches instead of the shared slots, counted (for `/metrics`)."""
        self.context_tokens: int | None = None
        """The thinker's context (its `max_position_embeddings`), once loaded."""

    @abstractmethod
    def load(self) -> None:
        """Load the weights (blocking); raise `EngineError` with a clear message on failure."""

    @abstractmethod
    def unload(self) -> None:
        """Drop every reference to the model so its memory can be freed."""

    def prepare(self, request: ResponseRequest) -> Any:
        """CPU-side preparation of a request (prompt, features); runs off the event loop and off the GPU thread."""
        return request

    @abstractmethod
    def make_generation(self, prepared: Any) -> Generation:
        """Start one request's incremental loop; called on the GPU worker thread."""

    def step_batch(self) -> StepBatch | None:
        """A batched step over several generations, when the engine has one."""
        return None

    def encode_prompt(
        self, inputs: dict[str, torch.Tensor], conversation_id: str, audio_keys: tuple[str, ...], *, talker_states: bool
    ) -> EncodedPrompt:
        """The thinker prefill of a request, continuing its conversation's stored prompt where it can."""
        return encode_prompt(
            self.model.thinker, self.prefixes, conversation_id, inputs, audio_keys, talker_states=talker_states
        )

    def out_of_memory(self) -> None:
        """A request ran out of accelerator memory: give up the stored prompts, then return the cached blocks."""
        self.prefixes.clear()
        free_accelerator_memory()

    def forget_conversation(self, conversation_id: str) -> None:
        """The conversation ended: drop its stored prompt."""
        self.prefixes.forget(conversation_id)

    def growing_caches(self) -> GrowingCaches:
        """A request's own decode path on growing caches (engines with slots override this)."""
        raise EngineError(f"{self.name}: this engine has no decode loop")

    def acquire_decoder(self, *, prompt_tokens: int, request_id: str) -> Decoder:
        """Seats in the shared slots when one is free and the prompt fits them, else the growing-cache path.

        No room is reserved for the answer: a sequence that fills its slot goes on on a growing cache of its own, so
        a long conversation keeps decoding in the batch until its prompt alone outgrows the slot.
        """
        if self.slots is not None:
            if prompt_tokens >= self.slots.thinker.tokens:
                self._static_cache_fallback("thinker_prompt_too_long")
                log.info("%s: request %r outgrows static_cache_tokens, decoding it eagerly", self.name, request_id)
            elif not self.slots.thinker.free_slots:
                self._static_cache_fallback("no_free_slot")
            else:
                return SlotSeats(self.slots, self.growing_caches, self._static_cache_fallback)
        return self.growing_caches()

    def _static_cache_fallback(self, reason: str) -> None:
        self.static_cache_fallbacks[reason] += 1

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve (its device failed), else None."""
        return self._worker.failure if self._worker is not None else None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def model(self) -> Any:
        """The loaded model (the subclass sets `_model` when it loads)."""
        return self._loaded(self._model)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._loaded(self._tokenizer)

    def _loaded(self, value: Any) -> Any:
        if value is None:
            raise EngineError(f"{self.name}: the model is not loaded")
        return value

    @property
    def audio_enabled(self) -> bool:
        """The model has its talker and vocoder (speech output)."""
        model = getattr(self, "_model", None)
        return model is not None and bool(model.has_talker)

    @property
    def health_problem(self) -> str | None:
        """Why the engine cannot serve (its GPU worker died or stalled), None when it can."""
        return self._worker.health_problem if self._worker is not None else None

    @property
    def load_info(self) -> tuple[int, int]:
        """(active generations, queued requests)."""
        return self._worker.load if self._worker is not None else (0, 0)

    async def start(self) -> None:
        async with self._start_lock:
            if self._ready:
                return
            await asyncio.to_thread(self.load)
            self._worker = GpuWorker(
                self.name,
                max_active=self.max_active,
                max_queued=self.max_queued,
                step_batch=self.step_batch(),
                on_out_of_memory=self.out_of_memory,
                device_check=lambda: device_failure(self.runtime.device),
                stall_timeout_s=self.stall_timeout_s,
            )
            self._ready = True
            log.info("%s: %s ready", self.name, self.model_id)

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        async for delta in self._stream(request, background=False):
            yield delta

    async def _stream(self, request: ResponseRequest, *, background: bool) -> AsyncIterator[Delta]:
        worker = self._worker
        if not self._ready or worker is None:
            raise EngineNotReady(f"{self.name}: the model is not loaded yet")
        prepared = await asyncio.to_thread(self._checked_prepare, request)
        async for delta in worker.stream(lambda: self.make_generation(prepared), background=background):
            yield delta

    def _checked_prepare(self, request: ResponseRequest) -> Any:
        """Refuse non-finite audio before, and a prompt over its budget after, the prompt is built."""
        check_audio_is_finite(request)
        prepared = self.prepare(request)
        inputs = getattr(prepared, "inputs", None)
        if isinstance(inputs, ModelInputs):
            check_prompt_budget(inputs.prompt_tokens, request)
        return prepared

    async def transcribe(self, audio_16k: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        """Speech recognition by the thinker itself, as one more text-only request on the same worker.

        It shares the queue and its limits with the answers (a full queue is `EngineBusy`) as background work:
        it waits while an answer has yet to produce its first audio. Cancelling the calling task cancels the
        generation, as for `respond`.
        """
        seconds = np.asarray(audio_16k).size / INPUT_RATE
        if seconds == 0:
            return ""
        request = transcription_request(audio_16k, language, prompt)
        pieces = [delta.text async for delta in self._stream(request, background=True) if isinstance(delta, TextDelta)]
        transcript = "".join(pieces).strip()
        log.debug("%s: transcribed %.2f s of audio into %d characters", self.name, seconds, len(transcript))
        return transcript

    async def close(self) -> None:
        self._ready = False
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.to_thread(worker.close)
        self.unload()
        free_accelerator_memory()
