"""Voice-to-voice latency over WebRTC on loopback, scripted engine, client clock.

For each turn an aiortc caller speaks (espeak-ng), then waits for the agent. Printed per turn and as p50/p95:
  v2v        last caller speech sample sent -> first loud agent frame received
  vad        last caller speech sample sent -> `input_audio_buffer.speech_stopped` received (the silence window)
  server     `speech_stopped` received -> first loud agent frame received (engine, pacing, Opus both ways)

    python benchmarks/webrtc_latency.py --turns 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aioice.ice
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnivox.pipeline.engines.scripted import ScriptedEngine
from tests.server_helpers import running_server, scripted_config
from tests.test_webrtc import RATE, Peer, speech_48k

PHRASES = ["What time is it?", "Tell me about the weather.", "Can you help me?", "Thank you very much."]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def run(turns: int, reply: str) -> None:
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    rows: list[tuple[float, float, float]] = []
    with running_server(scripted_config(), ScriptedEngine(reply=reply)) as server:
        peer = Peer()
        try:
            assert (await peer.connect(server)).status_code == 201
            await peer.wait_for("session.created", timeout=10)
            await asyncio.sleep(0.5)
            for turn in range(1, turns + 1):
                speech = speech_48k(PHRASES[turn % len(PHRASES)])
                onset = peer.mic.say(speech)
                voiced = np.flatnonzero(np.abs(speech) > 0.01)
                speech_end = onset + (voiced[-1] + 1) / RATE  # espeak pads its clips with silence
                await peer.wait_for("input_audio_buffer.speech_stopped", turn)
                stopped_at = time.monotonic()
                await peer.wait_for("response.done", turn)
                first_audio = next(
                    t for t, pcm in peer.received if t > speech_end and float(np.sqrt(np.mean(pcm**2))) > 0.01
                )
                await peer.wait_for("output_audio_buffer.stopped", turn)
                rows.append((first_audio - speech_end, stopped_at - speech_end, first_audio - stopped_at))
                print(
                    f"turn {turn:2d}  v2v {rows[-1][0] * 1000:6.0f} ms  vad {rows[-1][1] * 1000:6.0f} ms  "
                    f"server {rows[-1][2] * 1000:6.0f} ms",
                    flush=True,
                )
                await asyncio.sleep(0.3)
        finally:
            await peer.close()
    for index, name in enumerate(("v2v", "vad silence window", "server share")):
        values = [row[index] * 1000 for row in rows]
        print(
            f"{name:20s} p50 {percentile(values, 0.5):6.0f} ms  p95 {percentile(values, 0.95):6.0f} ms  "
            f"mean {statistics.mean(values):6.0f} ms  (n={len(values)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--reply", default="Sure, here is a short answer.")
    args = parser.parse_args()
    asyncio.run(run(args.turns, args.reply))


if __name__ == "__main__":
    main()
