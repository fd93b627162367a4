"""Record -> (prompt text, target text): the model-facing layout, saved with every run.

A `PromptFormat` is plain data (JSON via `to_dict`/`from_dict`) so the run manifest
stores it and inference rebuilds *exactly* the prompts used in training, even if the
tokenizer's chat template changes later. Three layouts:

- `chat`: one user message = instruction, blank line, input, rendered with the
  tokenizer's chat template (stored here as a string) and the generation prompt; a
  template that injects a default system message (SmolLM2's does) keeps doing so, in
  training and inference alike. Target = whatever the template writes before an
  assistant reply's content (usually nothing) + output + the end-of-turn text.
- `plain`: "### Instruction / ### Input / ### Response" (Alpaca-style), target =
  output + the EOS token's text.
- `seq2seq` (T5): source = instruction, blank line, input; target = bare output (the
  tokenizer appends `</s>` itself).

Prompts and targets are built from a record's fields; the answer is never located by
string search. Special tokens (BOS, template markers) are part of the prompt *text*,
so causal prompts are tokenised with `add_special_tokens=False` (see
`add_special_tokens`), the same rule `apply_chat_template(tokenize=True)` uses.

No torch/transformers import; `for_tokenizer` only calls tokenizer methods.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from t2t_mtl.core.errors import ConfigError, Problem

if TYPE_CHECKING:  # type-only: this module stays importable without transformers
    from transformers import PreTrainedTokenizerBase

__all__ = ["KINDS", "LAYOUT_VERSION", "TRUNCATIONS", "PromptFields", "PromptFormat"]

LAYOUT_VERSION = 2  # 2: `truncation` (1 always cut the end of an over-long input)
KINDS = ("chat", "plain", "seq2seq")
TRUNCATIONS = ("middle", "end")
# Probe strings used once, on the chat *template* (never on data), to learn what the
# template writes around an assistant reply.
_PROBE_USER = "\x00probe-user\x00"
_PROBE_ANSWER = "\x00probe-answer\x00"


class PromptFields(Protocol):
    """What a prompt and its target are built from: a `core.records.Record`, or any object with
    these three text fields."""

    instruction: str
    input: str
    output: str


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers in some HF
    templates) renders its body unchanged; we only need the text."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str, today: str) -> jinja2.Template:
    """Compile a chat template in an environment like transformers' (trim/lstrip blocks,
    loop controls, `tojson`, `raise_exception`), so both render identically; the date
    that `strftime_now` returns is pinned so prompts never drift between runs."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = (
        lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: _dt.datetime.fromisoformat(today).strftime(fmt)
    return env.from_string(template)


@dataclass
class PromptFormat:
    """How records become model text; build with `for_tokenizer`, persist with `to_dict`."""

    kind: str  # chat | plain | seq2seq
    version: int = LAYOUT_VERSION
    chat_template: str | None = None  # chat: the tokenizer's template at training time
    template_vars: dict[str, str] = field(
        default_factory=dict
    )  # chat: bos_token, eos_token, ... as HF passes them
    template_date: str = "2024-01-01"  # chat: what strftime_now() sees (pinned for reproducibility)
    bos_text: str = ""  # plain: BOS token text put in front when the tokenizer normally adds one
    answer_prefix: str = ""  # chat: text a template writes before an assistant reply's content
    answer_suffix: str = ""  # causal: end-of-turn / EOS text after the answer (it is trained on)
    truncation: str = "middle"  # which part of an over-long input is cut (features.prompt_ids)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown prompt format kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "chat" and not self.chat_template:
            raise ValueError("a chat prompt format needs the chat template")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(
                f"unknown truncation {self.truncation!r}; expected one of {TRUNCATIONS}"
            )
        self._compiled: jinja2.Template | None = None
        self._frame: tuple[str, str] | None = None  # `_user_frame`, for the template `_frame_of`
        self._frame_of: object = None

    # ------------------------------------------------------------------ layout

    @staticmethod
    def user_message(record: PromptFields) -> str:
        """Instruction, a blank line, then the input (just the instruction if input is empty)."""
        return f"{record.instruction}\n\n{record.input}" if record.input else record.instruction

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Render messages with the stored chat template (as `apply_chat_template` would)."""
        if self._compiled is None:
            self._compiled = _compile(self.chat_template or "", self.template_date)
        return self._compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self.template_vars,
        )

    def _user_frame(self) -> tuple[str, str] | None:
        """(text before, text after) a user message's content in a one-turn chat prompt, when the
        template writes the content verbatim whatever it is; else None.

        Rendering the chat template (Jinja) is a sizeable share of preparing a training example,
        and a one-turn prompt is the same frame around every content. The frame is trusted only if
        contents of different shapes (whitespace at either end, line breaks, markup) all come out
        verbatim between the same two texts, so a template that trims, escapes or branches on them
        keeps being rendered for every record."""
        if self._compiled is None or self._frame_of is not self._compiled:
            probes = (
                "\x00t2t\x00",
                "  \x00lead and trail\x00 \n",
                "\n\x00<tool_response>\x00</tool_response>\n\n\x00",
                "\x00{{ x }} {% y %} <|im_end|>\x00",
            )
            texts = [self.render_chat([{"role": "user", "content": p}], True) for p in probes]
            at = texts[0].find(probes[0])
            frame = (texts[0][:at], texts[0][at + len(probes[0]) :]) if at >= 0 else None
            ok = frame is not None and all(
                t == frame[0] + p + frame[1] for p, t in zip(probes, texts)
            )
            self._frame, self._frame_of = (frame if ok else None), self._compiled
        return self._frame

    def prompt(self, record: PromptFields) -> str:
        """The text the model sees before its answer (special tokens included as text)."""
        if self.kind == "chat":
            content = self.user_message(record)
            frame = self._user_frame()
            if frame is not None:
                return frame[0] + content + frame[1]
            return self.render_chat([{"role": "user", "content": content}], True)
        if self.kind == "plain":
            parts = [f"### Instruction:\n{record.instruction}"]
            if record.input:
                parts.append(f"### Input:\n{record.input}")
            parts.append("### Response:\n")
            return self.bos_text + "\n\n".join(parts)
        return self.user_message(record)

    def target(self, record: PromptFields) -> str:
        """What the model learns to produce: output plus end-of-turn text (causal), bare output (seq2seq)."""
        if self.kind == "seq2seq":
            return record.output
        return self.answer_prefix + record.output + self.answer_suffix

    @property
    def add_special_tokens(self) -> bool:
        """Tokenizer flag for prompts: False for causal layouts (special tokens are already in
        the text); True for seq2seq (T5 appends `</s>` to the source)."""
        return self.kind == "seq2seq"

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (stored in the run manifest)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptFormat:
        """Inverse of `to_dict`; rejects layouts newer than this code understands."""
        version = int(d.get("version", LAYOUT_VERSION))
        if version > LAYOUT_VERSION:
            raise ConfigError(
                [
                    Problem(
                        "<manifest>",
                        None,
                        f"prompt format version {version} is newer than this "
                        f"t2t-mtl understands ({LAYOUT_VERSION})",
                        "upgrade t2t-mtl",
                    )
                ]
            )
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if version < 2:
            known["truncation"] = (
                "end"  # what layout 1 did; a run trained then is prompted the same way
            )
        return cls(**known)

    # ------------------------------------------------------------- selection

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        family: str,
        mode: str = "auto",
        truncation: str = "middle",
    ) -> PromptFormat:
        """Choose the layout for a tokenizer and model family (`truncation`: see `features.prompt_ids`).

        seq2seq family -> `seq2seq`; otherwise `chat` when the tokenizer has a chat template
        and `mode` is "auto" or "chat", `plain` when `mode` is "plain" or there is no
        template. `mode="chat"` without a template is a ConfigError naming the fix.
        """
        if family == "seq2seq":
            return cls(kind="seq2seq", truncation=truncation)
        if mode not in ("auto", "chat", "plain"):
            raise ConfigError(
                [
                    Problem(
                        "<config>",
                        None,
                        f"model.prompt_format: invalid value {mode!r}",
                        "expected one of: auto, chat, plain",
                    )
                ]
            )
        template = _chat_template_of(tokenizer)
        eos = getattr(tokenizer, "eos_token", None) or ""
        if mode == "chat" and template is None:
            raise ConfigError(
                [
                    Problem(
                        "<config>",
                        None,
                        "model.prompt_format: chat, but the tokenizer has no chat template",
                        "use prompt_format: plain (or auto)",
                    )
                ]
            )
        if mode == "plain" or template is None:
            return cls(
                kind="plain",
                bos_text=_bos_added_by(tokenizer),
                answer_suffix=eos,
                truncation=truncation,
            )
        special = {
            k: v
            for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
            if isinstance(v, str)
        }
        fmt = cls(
            kind="chat",
            chat_template=template,
            template_vars=special,
            template_date=_dt.date.today().isoformat(),
            truncation=truncation,
        )
        fmt.answer_prefix, fmt.answer_suffix = _reply_frame(fmt, eos)
        return fmt


def _chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's default chat template text, or None."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):  # several named templates; "default" is what apply_chat_template uses
        t = t.get("default")
    return t if isinstance(t, str) and t.strip() else None


def _bos_added_by(tokenizer: PreTrainedTokenizerBase) -> str:
    """The BOS text if the tokenizer puts a BOS in front of plain text by default, else ""."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if len(with_special) > len(without) and with_special[0] == bos_id else ""


def _reply_frame(fmt: PromptFormat, eos: str) -> tuple[str, str]:
    """Learn from the template what surrounds an assistant reply: (prefix, end-of-turn text).

    Render [user] + generation prompt, and [user, assistant=probe]; the second must extend
    the first. The end-of-turn text is cut after the EOS token when the template writes
    it, else at trailing whitespace (e.g. Gemma's "<end_of_turn>\\n" -> "<end_of_turn>"),
    so the model is trained to stop exactly where generation stops.
    """
    user = [{"role": "user", "content": _PROBE_USER}]
    prompt = fmt.render_chat(user, True)
    full = fmt.render_chat(user + [{"role": "assistant", "content": _PROBE_ANSWER}], False)
    if not full.startswith(prompt) or _PROBE_ANSWER not in full[len(prompt) :]:
        # Template re-renders history differently from the generation prompt: fall back
        # to answer + EOS, which is still consistent between training and inference.
        return "", eos
    prefix, after = full[len(prompt) :].split(_PROBE_ANSWER, 1)
    if eos and eos in after:
        suffix = after[: after.index(eos) + len(eos)]
    else:
        suffix = after.rstrip() or eos
    return prefix, suffix
