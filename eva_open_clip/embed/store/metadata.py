"""The metadata parquet of an output folder: every json field of every sample, one type per column.

A part's table has `image_path`, `caption` (with --captions), every json field found in any of its
samples (a sample without the field has null there), and `similarity` (with --captions). Json fields
are in name order. Each field has a *kind*, from the values it holds:

- `bool`, `int`, `float`, `str`: every non-null value is of that JSON type (ints and floats together
  are `float`, as JSON numbers are one type);
- `json`: objects, arrays, or values of more than one type: every non-null value is stored as its
  JSON text (`json.dumps`), so `json.loads` gives the value back;
- `null`: the field only ever held null.

A sample's json is taken as it is, with three rules so that any json can be stored (`sample_fields`):
a field named like a fixed column (`image_path`, `caption`, `similarity`, or one of these after any
number of `json.`) is stored with one more `json.` before its name (`caption` -> `json.caption`), so
no field is lost and no two share a column; a string holding an unpaired UTF-16 surrogate (`"\ud83d"`,
not Unicode text, which crawled data contains) has U+FFFD in its place, as every UTF-8 encoder does;
json nested deeper than MAX_DEPTH levels makes the sample a `bad_json` skip.

Parts are written as they come, each with its own kinds. At the end of a job `folder_kinds` merges
the kinds of every part by the same rule, and `conform` rewrites a part whose columns or types differ,
so that every part of the folder has the same schema: `pyarrow.dataset.dataset('DIR/metadata')` and
`pandas.concat` of the parts read every field of every row.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable

import pyarrow as pa

FIXED_FIRST, FIXED_LAST = ('image_path', 'caption'), ('similarity',)
_TYPES = {'bool': pa.bool_(), 'int': pa.int64(), 'float': pa.float64(), 'str': pa.string(), 'json': pa.string(),
          'null': pa.null()}
_INT64 = (-2 ** 63, 2 ** 63 - 1)
_RESERVED = re.compile(r'(json\.)*(' + '|'.join(map(re.escape, FIXED_FIRST + FIXED_LAST)) + ')')
MAX_DEPTH = 100


def column_name(field: str) -> str:
    """The column of a json field: a fixed column's name gets one more `json.` in front (see the module doc)."""
    return 'json.' + field if _RESERVED.fullmatch(field) else field


def _utf8(value: str) -> str:
    try:
        value.encode('utf-8')
        return value
    except UnicodeEncodeError:  # unpaired surrogates: U+FFFD each, as a UTF-8 encoder writes them
        return value.encode('utf-16-le', 'surrogatepass').decode('utf-16-le', 'replace')


def _depth_within(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, dict):
        return {_utf8(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def sample_fields(fields: dict) -> dict:
    """A sample's json object as it is stored (see the module doc); ValueError when nested too deep."""
    if not _depth_within(fields, MAX_DEPTH):
        raise ValueError(f'nested deeper than {MAX_DEPTH} levels')
    return {column_name(_utf8(k)): _clean(v) for k, v in fields.items()}


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return 'bool'
    if isinstance(value, int):
        return 'int' if _INT64[0] <= value <= _INT64[1] else 'json'
    return {float: 'float', str: 'str'}.get(type(value), 'json')


def merge_kinds(kinds: Iterable[str]) -> str:
    """The kind of a field that holds values of these kinds (see the module docstring)."""
    found = set(kinds) - {'null'}
    if found == {'int', 'float'}:
        return 'float'
    if len(found) > 1:
        return 'json'
    return found.pop() if found else 'null'


def _values(values: list[Any], kind: str) -> list[Any]:
    if kind == 'json':
        return [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
    if kind == 'float':
        return [None if v is None else float(v) for v in values]
    return values


def part_table(rows: list[dict[str, Any]], json_fields: list[dict[str, Any] | None],
               fixed_types: dict[str, pa.DataType]) -> tuple[pa.Table, dict[str, str]]:
    """A part's table and the kinds of its json fields: `rows` holds the fixed columns, `json_fields` the rest."""
    names = sorted({k for fields in json_fields if fields for k in fields})
    columns = {name: [(fields or {}).get(name) for fields in json_fields] for name in names}
    kinds = {name: merge_kinds(_kind_of(v) for v in values if v is not None) for name, values in columns.items()}
    arrays = {name: pa.array([r[name] for r in rows], fixed_types[name]) for name in fixed_types
              if name in FIXED_FIRST}
    arrays.update({name: pa.array(_values(columns[name], kinds[name]), _TYPES[kinds[name]]) for name in names})
    arrays.update({name: pa.array([r[name] for r in rows], fixed_types[name]) for name in fixed_types
                   if name in FIXED_LAST})
    return pa.table(arrays), kinds


def folder_kinds(parts_kinds: Iterable[dict[str, str]]) -> dict[str, str]:
    """The kind of every json field over all the parts of a folder, in name order."""
    seen: dict[str, list[str]] = {}
    for kinds in parts_kinds:
        for name, kind in kinds.items():
            seen.setdefault(name, []).append(kind)
    return {name: merge_kinds(seen[name]) for name in sorted(seen)}


def conform(table: pa.Table, kinds: dict[str, str], target: dict[str, str]) -> pa.Table:
    """`table` (a part with json field `kinds`) with exactly the folder's json fields and types."""
    fixed_first = [n for n in FIXED_FIRST if n in table.column_names]
    fixed_last = [n for n in FIXED_LAST if n in table.column_names]
    arrays = {n: table.column(n) for n in fixed_first}
    for name, kind in target.items():
        have = kinds.get(name)
        if have is None or have == 'null':
            arrays[name] = pa.nulls(table.num_rows, _TYPES[kind])
        elif have == kind:
            arrays[name] = table.column(name)
        else:  # int -> float, or any kind -> json text
            arrays[name] = pa.array(_values(table.column(name).to_pylist(), kind), _TYPES[kind])
    arrays.update({n: table.column(n) for n in fixed_last})
    return pa.table(arrays)
