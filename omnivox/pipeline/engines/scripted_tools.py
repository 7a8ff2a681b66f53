"""The scripted engine's tool mode: configured rules that turn a caller's words into a function call, and the
function's output into a spoken answer, so that every door can be tested end to end with function calling.

A rule (`engine.options.scripted.tools` in the config) reads:

```yaml
- when: [weather, raining]           # any of these words in the caller's last turn (typed, or recognised speech)
  call: get_weather                  # the function to call (only when the request declares it)
  arguments: {city: Paris}           # or a string, sent as it is (a malformed one tests the error path)
  say: "Let me check."               # optional: spoken before the call
  answer: "It is {output[temperature]} degrees in {arguments[city]}."   # spoken once the output comes back
```

`answer` is a `str.format` template over `output` (the returned JSON value, or its text) and `arguments`; when it does
not fit the output, the output text is spoken as it is.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omnivox.pipeline.engines.base import ResponseRequest, ToolCallPart, ToolResultPart

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolRule:
    when: tuple[str, ...]
    call: str
    arguments: str = "{}"
    say: str = ""
    answer: str = "{output}"

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> ToolRule:
        unknown = sorted(set(data) - {"when", "call", "arguments", "say", "answer"})
        if unknown:
            raise ValueError(f"scripted engine: unknown tool rule key(s) {unknown}")
        when = data.get("when", ())
        words = (when,) if isinstance(when, str) else tuple(when)
        if not isinstance(data.get("call"), str) or not words or not all(isinstance(w, str) for w in words):
            raise ValueError("scripted engine: a tool rule needs `call` (a name) and `when` (words)")
        arguments = data.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return cls(
            tuple(w.lower() for w in words),
            data["call"],
            text,
            str(data.get("say", "")),
            str(data.get("answer", "{output}")),
        )

    def matches(self, words: set[str]) -> bool:
        return any(word in words for word in self.when)

    def spoken_answer(self, output: str, arguments: str) -> str:
        try:
            result = self.answer.format(output=_json_or_text(output), arguments=_json_or_text(arguments))
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            log.info("scripted engine: answer template %r does not fit the output; speaking the output", self.answer)
            result = output
        return result.strip() or output


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def choose_rule(rules: Sequence[ToolRule], request: ResponseRequest, heard: str) -> ToolRule | None:
    """The rule to call for the caller's words `heard`, among those whose function the request declares; a
    `required` tool choice (or a named one) picks a rule even when no word matches."""
    choice = request.tool_choice
    declared = {tool.name for tool in request.tools}
    usable = [rule for rule in rules if rule.call in declared and choice.function in (None, rule.call)]
    words = set(re.findall(r"[\w']+", heard.lower()))
    matched = next((rule for rule in usable if rule.matches(words)), None)
    if matched is None and choice.mode == "required" and usable:
        return usable[0]
    return matched


def answer_to_output(rules: Sequence[ToolRule], request: ResponseRequest) -> str | None:
    """The spoken answer when the request ends with function outputs, else None."""
    calls = {
        part.call_id: part for message in request.messages for part in message.parts if isinstance(part, ToolCallPart)
    }
    results: list[ToolResultPart] = []
    for message in reversed(request.messages):
        if message.role != "tool":
            break
        results[:0] = [part for part in message.parts if isinstance(part, ToolResultPart)]
    answers = []
    for result in results:
        call = calls.get(result.call_id)
        name = result.name or (call.name if call else "")
        rule = next((rule for rule in rules if rule.call == name), None)
        arguments = call.arguments if call else "{}"
        answers.append(rule.spoken_answer(result.output, arguments) if rule else result.output)
    return " ".join(answers) if results else None
