"""The Node.js clients in examples/node against a real server: their node:test suite drives the official
`openai` npm SDK (GA and beta classes), @openai/agents-realtime and plain `ws` through conformance cases."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server_helpers import running_server, scripted_config
from tests.test_tools_doors import TOOL_RULES

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
NODE_TESTS = sorted(NODE_DIR.glob("test/*.test.mjs"))
SHORT_REPLY = "Hello there, how are you?"
"""A 1.7 s answer: long enough to cancel mid-stream, short enough to keep the node run near 10 s."""


def node_skip_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (apt-get install nodejs npm)"
    if not (NODE_DIR / "node_modules").is_dir():
        return "examples/node/node_modules is missing: run `npm ci` in examples/node (scripts/test.sh does)"
    return None


def tap_totals(output: str) -> dict[str, int]:
    """The `# tests N`, `# pass N`, ... summary lines node's TAP reporter prints at the end."""
    return {
        key: int(value)
        for key, value in re.findall(r"^# (tests|pass|fail|cancelled|skipped|todo) (\d+)$", output, re.M)
    }


def declared_tests() -> int:
    return sum(len(re.findall(r"^\s*test\(", path.read_text(), re.M)) for path in NODE_TESTS)


@pytest.mark.slow
@pytest.mark.node
@pytest.mark.skipif(node_skip_reason() is not None, reason=node_skip_reason() or "")
def test_node_clients_pass_their_suite_against_a_live_server() -> None:
    config = scripted_config(engine={"options": {"scripted": {"reply": SHORT_REPLY, "tools": TOOL_RULES}}})
    with running_server(config) as server:
        result = subprocess.run(
            ["node", "--test", "--test-reporter=tap", *(str(path) for path in NODE_TESTS)],
            cwd=NODE_DIR,
            env={**os.environ, "OMNIVOX_TEST_URL": server.http_url},
            capture_output=True,
            text=True,
            timeout=120,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    totals = tap_totals(result.stdout)
    expected = declared_tests()
    assert expected >= 10, "the node test files were found"
    assert totals == {"tests": expected, "pass": expected, "fail": 0, "cancelled": 0, "skipped": 0, "todo": 0}, output[
        -8000:
    ]
