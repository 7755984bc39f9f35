"""open_clip's text tokenizer as a `tokenizers` file (`tokenizer.json`), built offline from the BPE
vocabulary open_clip ships, for serving stacks that tokenize without open_clip (Immich, Triton, ...).

open_clip cleans each text with ftfy and `html.unescape`, collapses whitespace, lowercases, splits it
with CLIP's pattern and encodes each piece byte-level BPE with a `</w>` end-of-word suffix, between
`<start_of_text>` and `<end_of_text>`, truncated to the context. The file does the same with
`tokenizers` normalizers, pre-tokenizers and model. ftfy's character fixes that are tables (ligatures,
full-width forms, curly quotes, control characters) become normalizers built from ftfy's own tables.
Two of its repairs cannot be tables and are approximated: mojibake (`fix_encoding`) is left as it is,
and of the HTML entities only the common ones (`&amp;` twice, `&lt;`, `&gt;`, `&quot;`, `&#39;`,
`&apos;`, `&nbsp;`) are unescaped.

Padding is `<end_of_text>` where open_clip pads with id 0: the text towers pool the first
`<end_of_text>` (the largest id) under a causal mask, so nothing after it changes the embedding.
"""
from __future__ import annotations

from typing import Any

PAD_TOKEN = '<end_of_text>'
# CLIP's split: contractions, runs of letters, single digits, runs of other non-space characters
_SPLIT = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_ENTITIES = (('&amp;', '&'), ('&amp;', '&'), ('&lt;', '<'), ('&gt;', '>'), ('&quot;', '"'), ('&#39;', "'"),
             ('&apos;', "'"), ('&nbsp;', '\xa0'))


def _char_class(chars: list[str]) -> str:
    return '[' + ''.join(f'\\x{{{ord(c):x}}}' for c in chars) + ']'


def _ftfy_normalizers() -> list:
    """ftfy's table fixes, in its order: ligatures, character width, curly quotes, control characters."""
    from ftfy import chardata
    from tokenizers import Regex, normalizers
    steps = [normalizers.Replace(chr(code), text)
             for code, text in {**chardata.LIGATURES, **chardata.WIDTH_MAP}.items()]
    for pattern, plain in ((chardata.SINGLE_QUOTE_RE, "'"), (chardata.DOUBLE_QUOTE_RE, '"')):
        steps.append(normalizers.Replace(Regex(pattern.pattern), plain))
    removed = [chr(code) for code, text in chardata.CONTROL_CHARS.items() if text is None and code < 0x110000]
    steps.append(normalizers.Replace(Regex(_char_class(removed)), ''))
    return steps


def build_tokenizer(open_clip_tokenizer: Any, context_length: int):
    """A `tokenizers.Tokenizer` giving the ids of open_clip's `SimpleTokenizer`, padded and truncated to
    `context_length` (padding: `<end_of_text>`, see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = dict(open_clip_tokenizer.encoder)
    merges = [pair for pair, _ in sorted(open_clip_tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix='</w>'))
    entities = [normalizers.Replace(entity, text) for entity, text in _ENTITIES]
    tokenizer.normalizer = normalizers.Sequence(
        entities + _ftfy_normalizers() + [normalizers.NFC(), normalizers.Strip(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    start, end = '<start_of_text>', '<end_of_text>'
    tokenizer.add_special_tokens([AddedToken(start, normalized=True), AddedToken(end, normalized=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f'{start} $A {end}', special_tokens=[(start, vocab[start]), (end, vocab[end])])
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(length=context_length, pad_id=vocab[PAD_TOKEN], pad_token=PAD_TOKEN)
    return tokenizer


def tokenizer_config(context_length: int) -> dict[str, Any]:
    """`tokenizer_config.json`: what Immich reads (`pad_token`) and what transformers needs to load the
    folder as a fast tokenizer."""
    return {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': context_length,
            'bos_token': '<start_of_text>', 'eos_token': PAD_TOKEN, 'pad_token': PAD_TOKEN,
            'unk_token': PAD_TOKEN, 'clean_up_tokenization_spaces': False}
