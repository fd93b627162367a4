"""Tiny models and tokenizers built locally, for every test that needs a model (no network).

Public helpers (each builds once into `root/<name>` and returns that folder, so calling
them again with the same root is free; `tests/conftest.py` wraps them in session fixtures
`tiny_causal_dir` and `tiny_t5_dir`):

- `tiny_causal(root) -> Path`: a 2-layer Llama-style causal LM plus a byte-level BPE
  tokenizer trained here on `CORPUS`, with SmolLM2's ChatML chat template (which injects a
  default system message), `eos_token="<|im_end|>"`, `bos_token="<|endoftext|>"` (added in
  front by `add_special_tokens=True`, like Llama tokenizers do) and no pad token (like many
  causal tokenizers; `model.loading` sets one).
- `tiny_t5(root) -> Path`: a 2-layer T5 plus a SentencePiece unigram tokenizer trained
  here on `CORPUS` (`T5Tokenizer`, with `</s>` appended and 100 sentinel tokens).

Both load with `AutoTokenizer` / `AutoModelForCausalLM` / `AutoModelForSeq2SeqLM`.
Weights are seeded, so two builds give identical models.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# SmolLM2-135M-Instruct's chat template (public, from its tokenizer_config.json): the test
# tokenizer uses the same layout, default system message included, so tests exercise it.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = [
    "the movie",
    "this film",
    "the actor",
    "a review",
    "the story",
    "my friend",
    "the city",
    "the river",
    "a question",
    "the answer",
    "the model",
    "the teacher",
    "Paris",
    "Berlin",
]
_VERBS = ["is", "was", "seems", "became", "looks", "remains"]
_ADJS = [
    "good",
    "bad",
    "great",
    "terrible",
    "boring",
    "wonderful",
    "positive",
    "negative",
    "neutral",
    "long",
    "short",
    "funny",
    "sad",
    "clear",
]
_EXTRA = [
    "Is the sentiment positive or negative?",
    "Answer the question.",
    "Summarize the text.",
    "Find the named entities.",
    "Does the premise entail the hypothesis?",
    "### Instruction:",
    "### Input:",
    "### Response:",
    "Context: Question: Answer:",
    "PER LOC ORG MISC entailment",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A few hundred synthetic sentences (deterministic) to train the test tokenizers on."""
    rng = random.Random(seed)
    out = list(_EXTRA)
    while len(out) < n:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADJS)}"
        if rng.random() < 0.3:
            s += f" and {rng.choice(_ADJS)}, {rng.randint(0, 999)} times."
        out.append(s[0].upper() + s[1:] + rng.choice([".", "!", "?"]))
    return out


def _atomic_build(target: Path, build) -> Path:
    """Build into a temporary sibling folder and rename it, so parallel or interrupted
    test sessions never see a half-written model."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, target)
    except OSError:  # someone else finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_causal(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    bos_id = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A",
        pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", bos_id)],
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", unk_token=None
    )
    hf_tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    hf_tok.save_pretrained(out)

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=bos_id,
        eos_token_id=hf_tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)


def _build_t5(out: Path) -> None:
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    with tempfile.TemporaryDirectory() as td:
        text = Path(td) / "corpus.txt"
        text.write_text("\n".join(corpus()), encoding="utf-8")
        # T5's id layout: pad=0, eos=1, unk=2, no bos.
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(Path(td) / "sp"),
            vocab_size=160,
            hard_vocab_limit=False,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            minloglevel=2,
        )
        tok = T5Tokenizer.from_pretrained(td, vocab_file=str(Path(td) / "sp.model"))
    tok.save_pretrained(out)

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    T5ForConditionalGeneration(cfg).save_pretrained(out)


def tiny_causal(root: str | os.PathLike) -> Path:
    """Folder with a tiny Llama-style causal LM + chat-template tokenizer (built once per root)."""
    return _atomic_build(Path(root) / "tiny-causal", _build_causal)


def tiny_t5(root: str | os.PathLike) -> Path:
    """Folder with a tiny T5 + SentencePiece tokenizer trained here (built once per root)."""
    return _atomic_build(Path(root) / "tiny-t5", _build_t5)


def describe(path: Path) -> dict:
    """The saved config as a dict (handy in assertions and debugging)."""
    return json.loads((Path(path) / "config.json").read_text())
