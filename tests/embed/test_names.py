"""The rule that writes names of any bytes as one line of valid UTF-8 text, and gives the bytes back."""
from __future__ import annotations

import os
import random

from eva_open_clip.embed.store.names import name_text, original_name


def test_names_are_kept_or_quoted_and_reversible():
    examples = {b'plain.png': 'plain.png', 'ok/\u00e9.png'.encode(): 'ok/\u00e9.png', b'x\\y': 'x\\y',
                b'caf\xe9.png': '"caf\\xe9.png"', b'new\nline': '"new\\nline"', b'"q".png': '"\\"q\\".png"',
                b'tab\t\x7f': '"tab\\t\\x7f"', '\u2028'.encode(): '"\\u2028"', b'\xc2\x85': '"\\xc2\\x85"'}
    for raw, text in examples.items():
        assert name_text(raw) == text and name_text(os.fsdecode(raw)) == text
        assert original_name(text) == raw
    rng = random.Random(0)
    alphabet = [0, 9, 10, 13, 34, 92, 0x41, 0x75, 0x78, 0x7f, 0x80, 0xa8, 0xc2, 0xc3, 0xa9, 0xe2, 0xff]
    seen = {}
    for _ in range(20000):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        text = name_text(raw)
        text.encode('utf-8')  # valid UTF-8, one line
        assert len(text.splitlines()) <= 1 and original_name(text) == raw
        assert seen.setdefault(text, raw) == raw  # no two names share a text
