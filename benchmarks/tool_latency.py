"""Time from a tool's output to the agent's first audio on the Realtime WebSocket door.

Each round: the caller's question (a text item) makes the agent call `get_weather`; the client sends the tool's
output (`conversation.item.create` of a `function_call_output`) and `response.create`, and the clock runs from
sending that `response.create` to receiving the first `response.output_audio.delta` of the spoken answer. For
comparison the same is measured for a plain `response.create` after a user text item. Without `--url` a
scripted-engine server with a tool rule is started in a subprocess (its simulated time to first audio is
`engine.options.scripted.first_audio_ms`, 50 ms by default); with `--url` any omnivox server is measured (its engine
must call `get_weather` when asked about the weather, as Qwen-Omni does with the tool offered).

    python benchmarks/tool_latency.py [--rounds 20] [--url http://host:8000 --api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import websockets
import yaml
from sse_first_audio import scripted_server

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOL_RULE = {
    "when": ["weather"],
    "call": "get_weather",
    "arguments": {"city": "Paris"},
    "answer": "It is {output[temperature]} degrees and {output[sky]} in {arguments[city]}.",
}
OUTPUT = json.dumps({"temperature": 21, "sky": "clear"})


@contextlib.contextmanager
def scripted_tool_server() -> Iterator[str]:
    """`omnivox serve --engine scripted` with the benchmark's tool rule, healthy, for the block."""
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "tools.yaml"
        config.write_text(yaml.safe_dump({"engine": {"options": {"scripted": {"tools": [TOOL_RULE]}}}}))
        with scripted_server("--config", str(config)) as url:
            yield url


class Client:
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def until(self, event_type: str) -> dict[str, Any]:
        while True:
            event = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if event["type"] == "error":
                raise SystemExit(f"server error: {event['error']}")
            if event["type"] == event_type:
                return event

    async def ask(self, text: str) -> None:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        await self.send({"type": "conversation.item.create", "item": item})

    async def first_audio_after_create(self) -> float:
        """`response.create` sent -> first audio delta; the rest of the response is read to its end."""
        started = time.perf_counter()
        await self.send({"type": "response.create"})
        await self.until("response.output_audio.delta")
        elapsed = time.perf_counter() - started
        await self.until("response.done")
        return elapsed


async def measure(url: str, api_key: str, rounds: int) -> dict[str, list[float]]:
    ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/realtime?model=gpt-realtime"
    headers = {"Authorization": f"Bearer {api_key}"}
    figures: dict[str, list[float]] = {"tool output -> first audio": [], "text turn -> first audio": []}
    async with websockets.connect(ws_url, additional_headers=headers, max_size=None) as ws:
        client = Client(ws)
        await client.until("session.created")
        session = {"type": "realtime", "tools": [WEATHER_TOOL], "audio": {"input": {"turn_detection": None}}}
        await client.send({"type": "session.update", "session": session})
        await client.until("session.updated")
        for _ in range(rounds):
            await client.ask("What is the weather like today?")
            await client.send({"type": "response.create"})
            call = await client.until("response.function_call_arguments.done")
            await client.until("response.done")
            output = {"type": "function_call_output", "call_id": call["call_id"], "output": OUTPUT}
            await client.send({"type": "conversation.item.create", "item": output})
            figures["tool output -> first audio"].append(await client.first_audio_after_create())
            await client.ask("Thanks, that is all.")
            figures["text turn -> first audio"].append(await client.first_audio_after_create())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--url", help="a running omnivox server (default: start a scripted one)")
    parser.add_argument("--api-key", default="sk-local")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(scripted_tool_server())
        figures = asyncio.run(measure(url, args.api_key, args.rounds))
    for name, values in figures.items():
        ms = np.array(values) * 1000
        print(
            f"{name:28s} p50 {np.percentile(ms, 50):7.1f} ms  p95 {np.percentile(ms, 95):7.1f} ms  "
            f"mean {ms.mean():7.1f} ms  (n={len(ms)})"
        )


if __name__ == "__main__":
    main()
