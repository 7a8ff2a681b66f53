"""Prompt reuse across the hop: a front (the remote engine) in front of an engine host running Qwen2.5-Omni (tiny
random checkpoint). The host keeps each conversation's encoded prompt under the id the front sends, so a second
turn's prefill encodes only what the first prompt did not hold, as it does in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnivox.pipeline.engines.qwen2_5_omni import Qwen25OmniEngine
from tests.engines.test_server_turns import spoken_turn
from tests.remote_helpers import remote_config
from tests.server_helpers import running_server, scripted_config
from tests.test_conformance import connect

pytestmark = pytest.mark.slow


async def test_the_second_turn_prefills_only_the_new_turn_on_the_engine_host(tiny_qwen2_5_dir: Path) -> None:
    model = str(tiny_qwen2_5_dir)
    engine = Qwen25OmniEngine(model, device="cpu", max_text_tokens=12, max_audio_codes=60)
    with (
        running_server(scripted_config(), engine) as host,
        running_server(remote_config([host.http_url], model)) as front,
    ):
        async with connect(front) as wire:
            await wire.manual_mode()
            usages = []
            for question in ("What is the weather like in Paris?", "And tomorrow?"):
                await spoken_turn(wire, question)
                await wire.send({"type": "response.create"})
                done = (await wire.until("response.done", timeout=120))[-1]["response"]
                assert done["status"] == "completed"
                usages.append(done["usage"])
            session_id = wire.received[0]["session"]["id"]

    first, second = usages
    assert first["input_token_details"]["cached_tokens"] == 0
    # everything the first prompt held was reused: the prefill encoded the heard answer and the new question only
    assert second["input_token_details"]["cached_tokens"] == first["input_tokens"]
    assert second["input_tokens"] > first["input_tokens"]
    assert engine.prefixes.hits == 1
    assert session_id in engine.prefixes._entries  # kept under the front's session id, for its next turn
