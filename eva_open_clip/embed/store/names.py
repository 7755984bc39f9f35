r"""Names of files and tar members as text that any reader can take: one line, valid UTF-8, reversible.

File systems and tar archives name things with bytes; `embed` writes those names into parquet (UTF-8
only) and into `FILE.paths.txt` (one name per line). A name is written as it is when it is valid UTF-8
with no control or line-breaking character and does not begin with `"`. Any other name is written
quoted, as Git quotes such paths: between double quotes, with `\\` and `\"` for a backslash and a
quote, `\n`, `\r`, `\t`, `\xHH` for any other byte that is a control character or not part of valid
UTF-8, and `\uHHHH` for the line and paragraph separators U+2028/U+2029; every other character is kept.
So `caf\xe9.png` (Latin-1 bytes) is written `"caf\xe9.png"`, and the same bytes always give the same
text. `original_name(text)` gives the bytes back (`os.fsdecode` of them is the name Python uses).
"""
from __future__ import annotations

import os
import re

_ESCAPES = {'\\': '\\\\', '"': '\\"', '\n': '\\n', '\r': '\\r', '\t': '\\t'}
_UNESCAPES = {'\\': b'\\', '"': b'"', 'n': b'\n', 'r': b'\r', 't': b'\t'}
_NEEDS_QUOTES = re.compile('[\x00-\x1f\x7f-\x9f\u2028\u2029]')
_ESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)', re.DOTALL)


def _raw(name: str) -> bytes:
    """The bytes of a name as Python holds it (undecodable bytes as surrogate escapes)."""
    try:
        return os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate that is not a byte's escape
        return name.encode('utf-8', 'surrogatepass')


def _escaped(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if _NEEDS_QUOTES.match(char):
        return f'\\x{ord(char):02x}' if ord(char) < 0x80 else \
            ''.join(f'\\x{b:02x}' for b in char.encode()) if ord(char) < 0xa0 else f'\\u{ord(char):04x}'
    return char


def name_text(name: str | bytes) -> str:
    """The text written for a name (see the module docstring)."""
    raw = name if isinstance(name, bytes) else _raw(name)
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError:
        text = None
    if text is not None and not text.startswith('"') and not _NEEDS_QUOTES.search(text):
        return text
    parts = []
    rest = raw
    while rest:
        try:
            parts.append(''.join(map(_escaped, rest.decode('utf-8'))))
            break
        except UnicodeDecodeError as e:
            parts.append(''.join(map(_escaped, rest[:e.start].decode('utf-8'))))
            parts.append(''.join(f'\\x{b:02x}' for b in rest[e.start:e.end]))
            rest = rest[e.end:]
    return '"' + ''.join(parts) + '"'


def original_name(text: str) -> bytes:
    """The bytes of the name that `name_text` wrote as `text`."""
    if not (len(text) >= 2 and text.startswith('"') and text.endswith('"')):
        return text.encode('utf-8')
    out, pos, body = bytearray(), 0, text[1:-1]
    for match in _ESCAPE.finditer(body):
        out += body[pos:match.start()].encode('utf-8')
        code = match.group(1)
        if code[0] == 'x' and len(code) == 3:
            out.append(int(code[1:], 16))
        elif code[0] == 'u' and len(code) == 5:
            out += chr(int(code[1:], 16)).encode('utf-8')
        else:
            out += _UNESCAPES[code]
        pos = match.end()
    return bytes(out + body[pos:].encode('utf-8'))
