"""PromptFormat: layouts per family, chat-template fidelity, end-of-turn detection, persistence."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from t2t_mtl.core.errors import ConfigError
from t2t_mtl.core.records import Record
from t2t_mtl.model.prompt_format import LAYOUT_VERSION, PromptFormat

REC = Record(
    "sentiment",
    "Is the sentiment positive or negative?",
    "The movie was great.",
    "positive",
    {"variant": "direct"},
)


@pytest.fixture(scope="module")
def tok(tiny_causal_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_causal_dir)


def fake_tokenizer(template, eos="</s>", bos="<s>"):
    """Just enough of a tokenizer for the chat path (which never tokenises)."""
    return SimpleNamespace(
        chat_template=template,
        eos_token=eos,
        bos_token=bos,
        special_tokens_map={"eos_token": eos, "bos_token": bos},
    )


def test_chat_prompt_is_exactly_the_tokenizers_chat_template(tok):
    fmt = PromptFormat.for_tokenizer(tok, "causal")
    assert fmt.kind == "chat"
    expected = tok.apply_chat_template(
        [
            {
                "role": "user",
                "content": "Is the sentiment positive or negative?\n\nThe movie was great.",
            }
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert fmt.prompt(REC) == expected
    # SmolLM2's template injects its default system message; we keep it (train == inference).
    assert fmt.prompt(REC).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    assert fmt.prompt(REC).endswith("<|im_start|>assistant\n")
    assert (
        fmt.target(REC) == "positive<|im_end|>"
    )  # stop at end-of-turn, not the template's trailing "\n"


def test_prompt_plus_target_is_the_templates_rendering_of_the_full_turn(tok):
    fmt = PromptFormat.for_tokenizer(tok, "causal")
    full = tok.apply_chat_template(
        [
            {"role": "user", "content": fmt.user_message(REC)},
            {"role": "assistant", "content": REC.output},
        ],
        tokenize=False,
    )
    assert full.startswith(fmt.prompt(REC) + fmt.target(REC))
    assert full[len(fmt.prompt(REC) + fmt.target(REC)) :] == "\n"


def test_user_message_without_input_is_the_instruction():
    rec = Record("t", "Name a colour.", "", "blue")
    assert PromptFormat.user_message(rec) == "Name a colour."
    assert (
        PromptFormat.user_message(REC)
        == "Is the sentiment positive or negative?\n\nThe movie was great."
    )


def test_round_trip_through_json_keeps_the_layout_even_if_the_tokenizer_changes(tok):
    fmt = PromptFormat.for_tokenizer(tok, "causal")
    saved = json.loads(json.dumps(fmt.to_dict()))
    tok_template = tok.chat_template
    try:
        tok.chat_template = (
            "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a later, different template
        )
        again = PromptFormat.from_dict(saved)
    finally:
        tok.chat_template = tok_template
    assert again == fmt
    assert again.prompt(REC) == fmt.prompt(REC) and again.target(REC) == fmt.target(REC)


def test_plain_layout_and_bos(tok):
    fmt = PromptFormat.for_tokenizer(tok, "causal", mode="plain")
    assert fmt.kind == "plain"
    # the tiny tokenizer puts <|endoftext|> in front by default, so the plain prompt carries it as text
    assert fmt.bos_text == "<|endoftext|>"
    assert fmt.prompt(REC) == (
        "<|endoftext|>### Instruction:\nIs the sentiment positive or negative?\n\n"
        "### Input:\nThe movie was great.\n\n### Response:\n"
    )
    assert fmt.target(REC) == "positive<|im_end|>"
    no_input = fmt.prompt(Record("t", "Name a colour.", "", "blue"))
    assert "### Input" not in no_input and no_input.endswith("Name a colour.\n\n### Response:\n")


def test_auto_without_chat_template_is_plain_and_chat_without_template_is_an_error(tok):
    template = tok.chat_template
    try:
        tok.chat_template = None
        assert PromptFormat.for_tokenizer(tok, "causal").kind == "plain"
        with pytest.raises(ConfigError) as e:
            PromptFormat.for_tokenizer(tok, "causal", mode="chat")
        assert "model.prompt_format" in str(e.value) and "plain" in str(e.value)
    finally:
        tok.chat_template = template
    with pytest.raises(ConfigError, match="invalid value 'alpaca'"):
        PromptFormat.for_tokenizer(tok, "causal", mode="alpaca")


def test_seq2seq_ignores_templates_and_targets_are_bare(tok):
    fmt = PromptFormat.for_tokenizer(tok, "seq2seq")
    assert fmt.kind == "seq2seq" and fmt.add_special_tokens
    assert fmt.prompt(REC) == "Is the sentiment positive or negative?\n\nThe movie was great."
    assert fmt.target(REC) == "positive"


LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
    "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    "template,eos,prefix,suffix",
    [
        (LLAMA3, "<|eot_id|>", "", "<|eot_id|>"),  # end-of-turn is the EOS token
        (GEMMA, "<eos>", "", "<end_of_turn>"),  # end-of-turn is not EOS: cut at trailing whitespace
        (
            QWEN3_LIKE,
            "<|im_end|>",
            "<think>\n\n</think>\n\n",
            "<|im_end|>",
        ),  # template writes text before replies
    ],
)
def test_reply_frame_learned_from_other_templates(template, eos, prefix, suffix):
    fmt = PromptFormat.for_tokenizer(fake_tokenizer(template, eos=eos, bos="<bos>"), "causal")
    assert (fmt.answer_prefix, fmt.answer_suffix) == (prefix, suffix)
    assert fmt.target(REC) == prefix + "positive" + suffix
    if template == LLAMA3:
        assert fmt.prompt(REC).startswith(
            "<bos><|start_header_id|>user"
        )  # bos_token reaches the template


def test_template_helpers_are_supported_and_dates_are_pinned():
    template = (
        "{% generation %}{{ strftime_now('%Y') }}{% endgeneration %}{{ messages | tojson }}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    fmt = PromptFormat.for_tokenizer(fake_tokenizer(template), "causal")
    fmt.template_date = "2031-05-06"
    fmt._compiled = None
    assert fmt.prompt(REC).startswith("2031[")
    assert PromptFormat.from_dict(fmt.to_dict()).prompt(REC) == fmt.prompt(REC)


def test_template_that_renders_history_differently_falls_back_to_eos():
    # the generation prompt is not a prefix of the rendered conversation
    template = "{% if add_generation_prompt %}GEN:{% endif %}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    fmt = PromptFormat.for_tokenizer(fake_tokenizer(template, eos="</s>"), "causal")
    assert fmt.answer_prefix == "" and fmt.answer_suffix == "</s>"


def test_invalid_formats_are_rejected():
    with pytest.raises(ValueError):
        PromptFormat(kind="alpaca")
    with pytest.raises(ValueError):
        PromptFormat(kind="chat")
    newer = PromptFormat(kind="plain").to_dict() | {"version": LAYOUT_VERSION + 1}
    with pytest.raises(ConfigError, match="newer"):
        PromptFormat.from_dict(newer)


def test_truncation_is_stored_and_old_manifests_keep_cutting_the_end():
    fmt = PromptFormat(kind="plain", truncation="end")
    assert PromptFormat.from_dict(fmt.to_dict()).truncation == "end"
    assert (
        PromptFormat.from_dict(PromptFormat(kind="plain").to_dict()).truncation == "middle"
    )  # the default
    layout1 = {
        k: v for k, v in PromptFormat(kind="plain").to_dict().items() if k != "truncation"
    } | {"version": 1}
    assert (
        PromptFormat.from_dict(layout1).truncation == "end"
    )  # what runs trained before layout 2 were fed
    with pytest.raises(ValueError, match="truncation"):
        PromptFormat(kind="plain", truncation="start")


def test_module_does_not_import_torch():
    code = "import sys, t2t_mtl.model.prompt_format; sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


ODD = ("  lead and trail \n", "a\n\nb", "<tool_response>x</tool_response>", "{{ x }} {% y %}", "")


@pytest.mark.parametrize("template", [LLAMA3, GEMMA, QWEN3_LIKE])
def test_prompts_equal_the_rendered_template_for_any_content(template):
    """A one-turn prompt may be put together from a frame around the content (no Jinja per record),
    but only where that gives exactly the template's rendering: Llama 3's `| trim` keeps rendering."""
    fmt = PromptFormat.for_tokenizer(fake_tokenizer(template, eos="<eos>", bos="<bos>"), "causal")
    assert (fmt._user_frame() is None) == (template == LLAMA3)
    for text in ODD:
        rec = Record("t", "Say it.", text, "")
        want = fmt.render_chat([{"role": "user", "content": fmt.user_message(rec)}], True)
        assert fmt.prompt(rec) == want
