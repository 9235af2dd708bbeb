"""The built-in model's tokenizer: a small byte-level BPE trained on the project's own text.

It follows Qwen2.5's tokenizer design (byte-level BPE, the same pre-tokenizer regex so that every digit
is its own token, the same special tokens and chat template) with a vocabulary of a few hundred to a few
thousand entries instead of 151k, which keeps a tiny model's embedding and output layers cheap.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from surgery_r1_ros import protocol, vocab
from surgery_r1_ros.data import cues

# Qwen2.5's pre-tokenizer: words, single digits (\p{N} alone), punctuation runs and whitespace.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's special tokens, in Qwen's order (ids differ: ours start at 0).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The protocol's tags are single (non-special) tokens: shorter targets, and decoding keeps them.
TAG_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>", "<box>", "</box>")

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL's chat template (image placeholders expand to <|vision_start|><|image_pad|><|vision_end|>).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def project_texts() -> list[str]:
    """Every piece of text the project itself puts in prompts and targets: labels, questions, cues."""
    texts: list[str] = [DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant"]
    texts += list(vocab.ANSWERS) + list(vocab.INSTRUMENTS)
    texts += [vocab.instrument_phrase(i) for i in vocab.INSTRUMENTS]
    questions = [vocab.ORGAN_QUESTION]
    for instrument in vocab.INSTRUMENTS:
        questions += [vocab.STATE_QUESTION.format(instrument=instrument)]
        questions += [vocab.LOCATION_QUESTION.format(instrument=instrument)]
    for question in questions:
        for mode in protocol.PromptMode:
            texts.append(protocol.prompt_text(question, mode))
    for looks in (cues.INSTRUMENT_LOOKS, cues.STATE_CUES, cues.ORGAN_CUES):
        for phrases in looks.values():
            texts += list(phrases)
    texts += [
        "upper left", "upper right", "lower left", "lower right", "centre", "center", "middle",
        "left", "right", "top", "bottom", "The", "It", "is", "in the", "of the image", "so", "state",
    ]  # fmt: skip
    # Box text: every digit is its own token already; teach the brackets and commas.
    texts += [protocol.format_box((12.0, 345.0, 678.0, 90.0)), "[0,0,0,0]", "[1,2,3,4]"]
    texts += [protocol.build_target(a, (1.0, 2.0, 3.0, 4.0), "x") for a in vocab.ANSWERS]
    return texts


def train_tokenizer(texts: Iterable[str] = (), vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train the built-in byte-level BPE on the project's text plus ``texts`` and wrap it for transformers."""
    corpus = project_texts() + [t for t in texts if t]
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in TAG_TOKENS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    wrapped.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return wrapped
