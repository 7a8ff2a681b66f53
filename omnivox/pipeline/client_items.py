"""Conversation items and audio as a Realtime client sends them, parsed into the session's `Item`s.

Everything here is hostile input: each value is type-checked and refused with a `ProtocolError` naming its field.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from typing import Any

import numpy as np

from omnivox.pipeline.audio import AudioFormat, resample
from omnivox.pipeline.conversation import Item
from omnivox.pipeline.engines.base import INPUT_RATE
from omnivox.pipeline.events import ProtocolError
from omnivox.pipeline.media import ImageLimits, MediaError, check_image
from omnivox.pipeline.tools import MAX_ARGUMENTS_CHARS, MAX_OUTPUT_CHARS

MAX_APPEND_BYTES = 15 * 1024 * 1024
"""OpenAI's limit for one audio chunk (decoded bytes)."""


def decode_client_audio(data: Any, input_format: AudioFormat, param: str) -> np.ndarray:
    """Base64 audio in the session's input format -> float32 at the format's rate."""
    if not isinstance(data, str):
        raise ProtocolError("audio must be a base64 string", code="invalid_audio", param=param)
    if len(data) > MAX_APPEND_BYTES * 4 // 3 + 4:
        raise ProtocolError("audio chunk over the 15 MiB limit", code="audio_too_large", param=param)
    try:  # strict mode accepts exactly what b64decode(validate=True) does, without its regex pass over the text
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("audio is not valid base64", code="invalid_audio", param=param) from None
    try:
        return input_format.decode(raw)
    except ValueError as exc:
        raise ProtocolError(
            f"audio does not match {input_format.name}: {exc}", code="invalid_audio", param=param
        ) from None


def parse_item(data: Any, input_format: AudioFormat, new_id: Callable[[str], str], images: ImageLimits) -> Item:
    """A `conversation.item.create` item (or a `response.create` input item) -> an `Item`; user audio is decoded
    from the session's input format to 16 kHz, images are checked against `images` (undecoded)."""
    if not isinstance(data, dict):
        raise ProtocolError("conversation.item.create needs an 'item' object", param="item")
    kind = data.get("type", "message")
    if kind in ("function_call", "function_call_output"):
        return _parse_function_item(data, kind, new_id)
    if kind != "message":
        raise ProtocolError(
            f"item type '{kind}' is not supported (message, function_call or function_call_output)", param="item.type"
        )
    role = data.get("role")
    if role not in ("user", "assistant", "system"):
        raise ProtocolError("item.role must be user, assistant or system", param="item.role")
    content = data.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError("item.content must be a non-empty list", param="item.content")
    item_id = data.get("id") if isinstance(data.get("id"), str) else new_id("item")
    item = Item(item_id, role)
    texts: list[str] = []
    audio: list[np.ndarray] = []
    for index, part in enumerate(content):
        param = f"item.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise ProtocolError("text content needs a 'text' string", param=f"{param}.text")
            texts.append(part["text"])
        elif kind == "input_audio" and role == "user":
            samples = decode_client_audio(part.get("audio"), input_format, f"{param}.audio")
            audio.append(resample(samples, input_format.rate, INPUT_RATE))
            if isinstance(part.get("transcript"), str):
                item.transcript = part["transcript"]
        elif kind in ("output_audio", "audio") and role == "assistant":
            texts.append(part.get("transcript") or "")
        elif kind == "input_image" and role == "user":
            if len(item.images) >= images.max_count:
                message = f"an item holds at most {images.max_count} images"
                raise ProtocolError(message, code="too_many_images", param=f"{param}.image_url")
            item.images.append(parse_image(part.get("image_url"), f"{param}.image_url", images))
        else:
            raise ProtocolError(f"content type '{kind}' is not supported for role {role}", param=f"{param}.type")
    item.text = " ".join(t for t in texts if t)
    if audio:
        item.audio = np.concatenate(audio)
    return item


def _parse_function_item(data: dict[str, Any], kind: str, new_id: Callable[[str], str]) -> Item:
    """A function call (a client replaying history) or the output the client returns for a call."""
    call_id = data.get("call_id")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= 256:
        raise ProtocolError("item.call_id must be a non-empty string", param="item.call_id")
    item_id = data.get("id") if isinstance(data.get("id"), str) else new_id("item")
    if kind == "function_call_output":
        output = data.get("output")
        if not isinstance(output, str) or len(output) > MAX_OUTPUT_CHARS:
            raise ProtocolError(
                f"item.output must be a string of at most {MAX_OUTPUT_CHARS} characters", param="item.output"
            )
        return Item(item_id, "tool", type="function_call_output", call_id=call_id, output=output)
    name = data.get("name")
    arguments = data.get("arguments", "")
    if not isinstance(name, str) or not name:
        raise ProtocolError("item.name must be the called function's name", param="item.name")
    if not isinstance(arguments, str) or len(arguments) > MAX_ARGUMENTS_CHARS:
        raise ProtocolError(
            f"item.arguments must be a JSON string of at most {MAX_ARGUMENTS_CHARS} characters", param="item.arguments"
        )
    return Item(item_id, "assistant", type="function_call", call_id=call_id, name=name, arguments=arguments)


def parse_image(url: Any, param: str, limits: ImageLimits) -> tuple[bytes, str]:
    """A base64 data URL -> (bytes, mime type), its format and size checked on the header; the server fetches
    nothing."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ProtocolError("image_url must be a base64 data URL", param=param)
    header, _, data = url.partition(";base64,")
    if len(data) > limits.max_bytes * 4 // 3 + 4:
        raise ProtocolError(f"the image is larger than {limits.max_bytes} bytes", code="image_too_large", param=param)
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("image_url is not valid base64", param=param) from None
    try:
        return raw, check_image(raw, header[len("data:") :], limits).mime_type
    except MediaError as exc:
        raise ProtocolError(str(exc), code=exc.code, param=param) from None
