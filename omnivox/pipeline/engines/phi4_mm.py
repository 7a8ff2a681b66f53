"""The local LLM stage `phi4-mm`: Microsoft's Phi-4-multimodal-instruct in process, through transformers'
`Phi4MultimodalForCausalLM`, text streamed token by token.

It hears audio and sees images but answers in text only, so it runs as the LLM stage of the cascade engine. Loading
is the Qwen engines' (hub id or local directory, `HF_HOME`, progress bars, errors that name the path). Caller audio
goes through the checkpoint's feature extractor (`<|audio|>` expanded to its embedding count) and images through its
image processor (`<|image|>` expanded likewise; that processor needs torchvision, so without it images are left out).
The prompt is the model's chat format, `<|system|>...<|end|><|user|>...<|end|><|assistant|>`.

It does not call functions: the checkpoint's chat template can list tools in the system turn (`<|tool|>...<|/tool|>`)
but defines no form for a call or a result in the conversation, and no weights were at hand to learn what the model
writes, so the request's tools are not offered, and function calls and results a client put in the conversation are
left out (a `tool` turn would otherwise read `<|tool|>`, the token that opens the list of tools).

Each answer is a `Generation` on the shared GPU worker: a prefill, then one token per step on a growing cache,
sampled with `generate()`'s processors, so greedy decoding gives `generate()`'s tokens (tested on tiny random models).
As the pinned `generate()` does (checked: its override that would re-encode at `original_max_position_embeddings`
never drops the cache), the cache is kept when a sequence grows past the rotary embedding's short/long switch.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioPart,
    Delta,
    EngineError,
    EngineNotReady,
    ImagePart,
    ResponseRequest,
    TextDelta,
    TextPart,
    Usage,
)
from omnivox.pipeline.engines.qwen_common import (
    IncrementalText,
    Runtime,
    Sampling,
    TokenSampler,
    decode_image,
    free_accelerator_memory,
    load_pretrained,
    load_tokenizer,
    make_generator,
    options_from_mapping,
    transcription_request,
)
from omnivox.pipeline.engines.scheduler import GpuWorker

log = logging.getLogger(__name__)

ENGINE = "phi4-mm"
DEFAULT_MODEL = "microsoft/Phi-4-multimodal-instruct"
AUDIO_TOKEN = "<|audio|>"
IMAGE_TOKEN = "<|image|>"
END = "<|end|>"


@dataclass(frozen=True)
class Phi4Options:
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N"."""
    dtype: str = "auto"
    """"auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float16", "float32"."""
    attn_implementation: str = "auto"
    max_active: int = 4
    """Answers advanced together on the GPU worker; more wait in the queue."""
    max_queued: int = 16
    """Requests allowed to wait; beyond this `server_busy`."""
    max_text_tokens: int = 1024
    """Longest answer when the request does not say (`max_tokens`)."""
    system_prompt: str = ""
    """Put before the session's instructions in the system turn."""
    revision: str | None = None
    """Hub revision of the checkpoint (a branch, tag or commit)."""

    def __post_init__(self) -> None:
        if self.max_active < 1 or self.max_queued < 0 or self.max_text_tokens < 1:
            raise ValueError("max_active and max_text_tokens must be >= 1, max_queued >= 0")


@dataclass
class Prepared:
    """A request turned into model inputs (on a thread pool, before it reaches the GPU worker)."""

    inputs: dict[str, torch.Tensor]
    sampling: Sampling
    seed: int | None
    max_tokens: int
    stops: tuple[str, ...]


class Phi4MmStage:
    """Phi-4-multimodal as an LLM stage (`hears_audio`, and `sees_images` where torchvision is installed)."""

    hears_audio = True

    def __init__(self, model: str = DEFAULT_MODEL, **options: Any) -> None:
        self.model_id = model
        self.options = options_from_mapping(Phi4Options, options, engine=ENGINE)
        self.runtime = Runtime.resolve(
            device=self.options.device,
            dtype=self.options.dtype,
            attn_implementation=self.options.attn_implementation,
            engine=ENGINE,
        )
        self.sees_images = importlib.util.find_spec("torchvision") is not None
        self.model: Any = None
        self.tokenizer: Any = None
        self.audio_processor: Any = None
        self.image_processor: Any = None
        self.eos_ids: frozenset[int] = frozenset()
        self.default_sampling = Sampling(temperature=0.0)
        self._worker: GpuWorker | None = None
        self._start_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._worker is not None

    # -------------------------------------------------------------------------------------------- loading

    def load(self) -> None:
        from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

        revision = {"revision": self.options.revision} if self.options.revision else {}
        self.model = load_pretrained(Phi4MultimodalForCausalLM, self.model_id, self.runtime, engine=ENGINE, **revision)
        self.tokenizer = load_tokenizer(self.model_id, engine=ENGINE)
        source = str(Path(self.model_id).expanduser()) if Path(self.model_id).expanduser().exists() else self.model_id
        try:
            self.audio_processor = Phi4MultimodalFeatureExtractor.from_pretrained(source, **revision)
        except (OSError, ValueError) as exc:
            raise EngineError(
                f"{ENGINE}: could not load the audio feature extractor of {self.model_id!r}: {exc}"
            ) from exc
        if self.sees_images:
            from transformers import AutoImageProcessor

            self.image_processor = AutoImageProcessor.from_pretrained(source, **revision)
        else:
            log.warning("%s: torchvision is not installed; image parts are left out", ENGINE)
        eos = self.model.generation_config.eos_token_id or self.model.config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
        self.default_sampling = Sampling.from_generation_config(self.model.generation_config)

    async def start(self) -> None:
        async with self._start_lock:
            if self._worker is not None:
                return
            await asyncio.to_thread(self.load)
            options = self.options
            self._worker = GpuWorker(
                ENGINE,
                max_active=options.max_active,
                max_queued=options.max_queued,
                on_out_of_memory=self.out_of_memory,
            )
            log.info("%s: %s ready", ENGINE, self.model_id)

    def out_of_memory(self) -> None:
        free_accelerator_memory()

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.to_thread(worker.close)
        self.model = None
        free_accelerator_memory()

    # -------------------------------------------------------------------------------------------- requests

    def prompt(self, request: ResponseRequest) -> tuple[str, list[np.ndarray], list[ImagePart]]:
        """The chat-format prompt with one placeholder per audio clip and image, and the clips and images in order."""
        system = "\n\n".join(t for t in (self.options.system_prompt.strip(), request.instructions.strip()) if t)
        text = f"<|system|>{system}{END}" if system else ""
        audio: list[np.ndarray] = []
        images: list[ImagePart] = []
        for message in request.messages:
            if message.role == "tool":
                continue
            content = ""
            for part in message.parts:
                if isinstance(part, TextPart):
                    content += part.text
                elif isinstance(part, AudioPart) and part.pcm.size:
                    audio.append(np.asarray(part.pcm, dtype=np.float32))
                    content += AUDIO_TOKEN
                elif isinstance(part, ImagePart) and self.image_processor is not None:
                    images.append(part)
                    content += IMAGE_TOKEN
            text += f"<|{message.role}|>{content}{END}"
        return text + "<|assistant|>", audio, images

    def prepare(self, request: ResponseRequest) -> Prepared:
        text, audio, images = self.prompt(request)
        tensors: dict[str, torch.Tensor] = {}
        if audio:
            features = self.audio_processor(audio, sampling_rate=INPUT_RATE, return_tensors="pt")
            sizes = [int(size) for size in features["audio_embed_sizes"]]
            text = _expand(text, AUDIO_TOKEN, sizes)
            tensors.update({key: value for key, value in features.items() if key.startswith("audio_")})
        if images:
            pixels = self.image_processor([decode_image(part) for part in images], return_tensors="pt")
            text = _expand(text, IMAGE_TOKEN, [int(n) for n in pixels["num_img_tokens"]])
            tensors.update({key: value for key, value in pixels.items() if key.startswith("image_")})
        input_ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        tensors["input_ids"] = input_ids
        tensors["attention_mask"] = torch.ones_like(input_ids)
        device, dtype = self.runtime.device, self.runtime.dtype
        inputs = {
            key: value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
            for key, value in tensors.items()
        }
        sampling = request.sampling
        return Prepared(
            inputs=inputs,
            sampling=self.default_sampling.overridden(
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
            ),
            seed=sampling.seed,
            max_tokens=sampling.max_tokens or self.options.max_text_tokens,
            stops=sampling.stop,
        )

    async def stream(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        async for delta in self._stream(request, background=False):
            yield delta

    async def _stream(self, request: ResponseRequest, *, background: bool) -> AsyncIterator[Delta]:
        worker = self._worker
        if worker is None:
            raise EngineNotReady(f"{ENGINE}: the model is not loaded yet")
        prepared = await asyncio.to_thread(self.prepare, request)
        async for delta in worker.stream(lambda: Phi4Generation(self, prepared), background=background):
            yield delta

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        """The model's own speech recognition, as background work on the same worker."""
        request = transcription_request(audio, language, prompt)
        pieces = [d.text async for d in self._stream(request, background=True) if isinstance(d, TextDelta)]
        return "".join(pieces).strip()


def _expand(text: str, placeholder: str, counts: list[int]) -> str:
    """Each occurrence of `placeholder`, in order, repeated as many times as its embeddings need."""
    pieces = text.split(placeholder)
    if len(pieces) != len(counts) + 1:
        raise EngineError(f"{ENGINE}: {len(counts)} media inputs for {len(pieces) - 1} placeholders")
    return "".join(piece + placeholder * count for piece, count in zip(pieces, [*counts, 0], strict=True))


class Phi4Generation:
    """One answer: prefill, then one token per step; text deltas, then usage."""

    def __init__(self, stage: Phi4MmStage, prepared: Prepared) -> None:
        from transformers import DynamicCache

        self.model = stage.model
        self.inputs = prepared.inputs
        self.history = prepared.inputs["input_ids"]
        self.prompt_tokens = int(self.history.shape[1])
        self.eos_ids = stage.eos_ids
        generator, _ = make_generator(prepared.seed, stage.runtime.device)
        self.sampler = TokenSampler(prepared.sampling, generator)
        self.text = IncrementalText(stage.tokenizer, prepared.stops)
        self.max_tokens = prepared.max_tokens
        self.cache: Any = DynamicCache(config=self.model.config)
        self.tokens = 0
        self.finished = False

    def step(self) -> list[Delta]:
        with torch.inference_mode():
            logits = self._forward()
        token = self.sampler(logits, self.history)
        if token in self.eos_ids:
            return self._finish([])
        self.history = torch.cat([self.history, self.history.new_tensor([[token]])], dim=1)
        self.tokens += 1
        piece = self.text.push(token)
        deltas: list[Delta] = [TextDelta(piece)] if piece else []
        if self.text.stopped or self.tokens >= self.max_tokens:
            return self._finish(deltas)
        return deltas

    def _forward(self) -> torch.Tensor:
        """Logits of the next token: the whole prompt (with its media) first, then the last token on the cache."""
        if self.cache.get_seq_length() == 0:
            media = {key: value for key, value in self.inputs.items() if key not in ("input_ids", "attention_mask")}
            output = self.model(
                input_ids=self.history,
                attention_mask=torch.ones_like(self.history),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
                **media,
            )
        else:
            output = self.model(
                input_ids=self.history[:, -1:],
                attention_mask=torch.ones_like(self.history),
                past_key_values=self.cache,
                use_cache=True,
            )
        return output.logits[:, -1, :]

    def _finish(self, deltas: list[Delta]) -> list[Delta]:
        tail = self.text.flush()
        if tail:
            deltas.append(TextDelta(tail))
        deltas.append(Usage(input_tokens=self.prompt_tokens, output_tokens=self.tokens))
        self.finished = True
        return deltas

    def close(self) -> None:
        self.cache = None
