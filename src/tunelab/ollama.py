"""An Ollama Modelfile for a GGUF export: the file, a TEMPLATE that renders prompts as the run was trained to read
them, the system prompt the template adds by default, and a stop for every end-of-turn token.

Ollama renders prompts with Go templates, not Jinja, so the run's chat template cannot be copied over. The formats
below are recognised by rendering: the run's own renderer (its chat template, or tunelab's alpaca) and each known
format's are given the same conversations, and a format is used only where every text comes out identical. A
template that matches none gets a TEMPLATE that passes the prompt through, a warning, and the Jinja original in a
comment, so nobody mistakes the file for a faithful one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Conversations every recognised format must render exactly as the run does (with the reply prompt at the end).
PROBES = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there."}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?\nThanks."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."}],
]
DEFAULT_PROBE = "\x01tunelab-default-system\x01"


@dataclass(frozen=True)
class Format:
    """A prompt format: each message is head(role) + content + tail(role), then the reply prompt; `turn_end` is the
    token that closes a reply ("{eos}": the tokenizer's EOS)."""
    name: str
    heads: dict
    tails: dict
    reply: str
    turn_end: str = "{eos}"

    def stops(self, eos: str) -> list[str]:
        """Every token that ends a reply: the format's own and EOS."""
        return [s for s in dict.fromkeys((self.turn_end.replace("{eos}", eos), eos)) if s]

    def render(self, messages: list[dict], system: str | None, eos: str) -> str:
        if system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system}] + list(messages)
        return "".join(self.heads[m["role"]] + m["content"] + self.tails[m["role"]].replace("{eos}", eos)
                       for m in messages) + self.reply

    def go_template(self, eos: str) -> str:
        """The same format for Ollama. No `{{-` trims: they would eat the newlines of the text around them."""
        branches = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{self.heads[role]}{{{{ .Content }}}}'
            f"{self.tails[role].replace('{eos}', eos)}" for i, role in enumerate(("system", "user", "assistant")))
        return f"{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{self.reply}"


CHATML = Format("ChatML", heads={r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")},
                tails=dict.fromkeys(("system", "user", "assistant"), "<|im_end|>\n"), reply="<|im_start|>assistant\n",
                turn_end="<|im_end|>")
ALPACA = Format("alpaca", heads={"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"},
                tails={"system": "\n\n", "user": "\n\n", "assistant": "{eos}\n\n"}, reply="### Response:\n")
FORMATS = (CHATML, ALPACA)


@dataclass(frozen=True)
class Recognised:
    format: Format | None
    system: str | None  # what the run's template puts first when a conversation has no system message


def default_system(render: Callable[[list[dict]], str], fmt: Format, eos: str) -> str | None:
    """The system message the run's template adds on its own, read off a conversation without one."""
    text = render([{"role": "user", "content": DEFAULT_PROBE}])
    head, tail = fmt.heads["system"], fmt.tails["system"].replace("{eos}", eos)
    if not text.startswith(head):
        return None
    end = text.find(tail, len(head)) if tail else -1
    found = text[len(head):end] if end > 0 else None
    return found if found and fmt.render([{"role": "user", "content": DEFAULT_PROBE}], found, eos) == text else None


def recognise(render: Callable[[list[dict]], str], eos: str) -> Recognised:
    """Which known format `render` (messages -> prompt text, reply prompt included) is, if any."""
    for fmt in FORMATS:
        try:
            system = default_system(render, fmt, eos)
            if all(render(p) == fmt.render(p, system, eos) for p in PROBES):
                return Recognised(fmt, system)
        except Exception:  # noqa: BLE001 - a template may refuse a probe (e.g. no system role): then it is not this
            continue
    return Recognised(None, None)


def quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError("text holds triple quotes")
    return f'"""{text}"""'


def modelfile(gguf_name: str, recognised: Recognised, stops: list[str], eos: str, raw_template: str | None,
              chat: bool) -> tuple[str, str | None]:
    """(Modelfile text, warning or None). `chat` False: a plain-text model, whose prompt is passed through as is."""
    lines = [f"# Written by tunelab export for {gguf_name}: `ollama create NAME -f Modelfile`, then `ollama run NAME`.",
             f"FROM ./{gguf_name}"]
    warning = None
    fmt = recognised.format
    if not chat:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    elif fmt is not None and "{{" not in "".join([*fmt.heads.values(), *fmt.tails.values(), eos]):
        lines.append(f"TEMPLATE {quoted(fmt.go_template(eos))}")
        if recognised.system:
            lines.append(f"SYSTEM {quoted(recognised.system)}")
    else:
        warning = ("the run's chat template is none of the formats tunelab can write for Ollama "
                   f"({', '.join(f.name for f in FORMATS)}), so the Modelfile's TEMPLATE passes prompts through "
                   "unformatted: give Ollama prompts already in the model's format (`ollama run` with raw input), or "
                   "write a TEMPLATE by hand from the original, which is in a comment at the end of the Modelfile. "
                   "llama.cpp reads the template from the GGUF itself and needs none of this.")
        lines.append(f"# WARNING: {warning}")
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines += [f"PARAMETER stop {quoted(s)}" for s in stops]
    if warning and raw_template:
        lines.append("# The run's chat template (Jinja), for reference:")
        lines += [f"# {line}" for line in raw_template.splitlines()]
    return "\n".join(lines) + "\n", warning
