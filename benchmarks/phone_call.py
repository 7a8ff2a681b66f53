"""Phone-call latency on loopback: a 5-turn `omnivox call` into `omnivox serve --engine scripted`, twice.

The first call waits for every answer (voice-to-voice latency: end of the caller's speech to the first agent audio
the simulated caller hears); the second talks over every answer but the last after `--barge-in-after` seconds
(barge-in latency: caller speech onset to Twilio's `clear`). Both run through the Twilio Media Streams door at real
time, 20 ms mu-law frames, with the server's own VAD (silence_duration_ms 500 is inside every voice-to-voice figure).

    python benchmarks/phone_call.py [--url ws://HOST:PORT/telephony/twilio] [--barge-in-after 1.5]

Without `--url` the server runs in a subprocess on a free loopback port. Prints the simulator's tables.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from omnivox.server.phone_sim import CallOptions, Utterance, format_report, run_call

PLAIN_TURNS = ["hello", "what time is it", "can you tell me about the weather", "thanks, one more question", "goodbye"]
BARGE_IN_TURNS = ["hello", "wait, what time is it", "hold on, the weather?", "sorry, one more question", "okay goodbye"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def scripted_server() -> Iterator[str]:
    """`omnivox serve --engine scripted` on a free port until the block ends; yields its telephony URL."""
    port = free_port()
    command = [sys.executable, "-m", "omnivox.server.cli", "serve", "--engine", "scripted", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("omnivox serve did not start") from None
                time.sleep(0.2)
        yield f"ws://127.0.0.1:{port}/telephony/twilio"
    finally:
        server.terminate()
        server.wait(timeout=15)


async def measure(url: str, barge_in_after_s: float) -> None:
    for title, turns, barge_in in (
        ("5-turn call, waiting for every answer", PLAIN_TURNS, None),
        (f"5-turn call, barging in {barge_in_after_s} s into each answer", BARGE_IN_TURNS, barge_in_after_s),
    ):
        options = CallOptions(url, [Utterance.say(text) for text in turns], barge_in_after_s=barge_in)
        print(f"## {title}\n{format_report(await run_call(options))}\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running Media Streams server (default: start a scripted omnivox)")
    parser.add_argument("--barge-in-after", type=float, default=1.5)
    args = parser.parse_args()
    if args.url:
        asyncio.run(measure(args.url, args.barge_in_after))
        return
    with scripted_server() as url:
        asyncio.run(measure(url, args.barge_in_after))


if __name__ == "__main__":
    main()
