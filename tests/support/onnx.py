"""ONNX Runtime and the exported folder as a client sees them: Immich's tokenizer set-up, CPU sessions,
the corpus the tokenizer is checked on, and the skip where the onnx extra or a recent torch is missing."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from eva_open_clip import versions

HAS_ONNX = all(importlib.util.find_spec(m) for m in ('onnx', 'onnxruntime', 'onnxscript', 'tokenizers'))
CAN_EXPORT = HAS_ONNX and versions.at_least(versions.TORCH, versions.ONNX_EXPORT_TORCH)
needs_export = pytest.mark.skipif(not CAN_EXPORT, reason="needs the onnx extra and torch >= 2.6 "
                                                         "(test_without_the_extra checks the line said there)")
# texts open_clip's cleaning changes in every way a tokenizers file can follow, and a text too long for the context
CORPUS = [
    '', '   ', 'a photo of a cat', 'Hello, World!!! ...', "it's don't we'll you're I'd THEY'VE", 'UPPER lower MiXeD',
    'Café déjà vu, naïve résumé', 'Straße İstanbul', 'Ελληνικά Русский עברית العربية', '東京タワーの写真',
    '한국어 텍스트', 'ｶﾀｶﾅ half-width', 'ＦＵＬＬ　ｗｉｄｔｈ １２３', 'emoji 😀🐱👍🏽', 'x\u0301 combining e\u0301',
    '“curly quotes” and ‘single’ ‛reversed‟', 'ﬁne ﬂowers ﬀ ĳ',
    'Tom &amp; Jerry &lt;3 &quot;hi&quot; it&#39;s &amp;amp;',
    'tab\tnew\nline  \r\n spaces', 'control\x00\x07chars\x7f', '\ufeffbom', 'a\xa0nbsp zero\u200bwidth',
    '#hashtag @user http://example.com/a?b=c&d=e', 'C++ & C# -- — – … !!', "'''quoted'''", '12:30pm 2024-01-01 3.14',
    'a<end_of_text>b <start_of_text>', 'x ' * 200, 'supercalifragilisticexpialidocious ' * 30,
]


def ids(tokenizer, texts) -> np.ndarray:
    """Token ids the way Immich tokenizes: the exported files, padded and truncated to the context."""
    return np.array([tokenizer.encode(' '.join(t.split())).ids for t in texts], dtype=np.int32)


def immich_tokenizer(folder):
    """The textual folder's tokenizer, set up exactly as Immich's OpenClipTextualEncoder does."""
    from tokenizers import Tokenizer
    context = json.loads((folder / 'config.json').read_text())['text_cfg'].get('context_length', 77)
    pad = json.loads((folder / 'textual' / 'tokenizer_config.json').read_text())['pad_token']
    tokenizer = Tokenizer.from_file(str(folder / 'textual' / 'tokenizer.json'))
    tokenizer.enable_padding(length=context, pad_token=pad, pad_id=tokenizer.token_to_id(pad))
    tokenizer.enable_truncation(max_length=context)
    return tokenizer


def session(path, level: str = 'ORT_ENABLE_ALL'):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
