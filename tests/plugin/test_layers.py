"""The layers of the package import one way: the store never imports the rest of the embedding tool, the tools
never import the command line, and the command line keeps to parsing and reporting."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / 'eva_open_clip'


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute (relative imports resolved), at any depth of its code."""
    here = '.'.join(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    package = here if path.name == '__init__.py' else here.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parent = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
                base = f'{parent}.{base}' if base else parent
            found.update(f'{base}.{alias.name}' for alias in node.names)
            found.add(base)
    return found


def _modules(folder: Path) -> dict[Path, set[str]]:
    return {path: _imports(path) for path in folder.rglob('*.py')}


def test_the_store_imports_nothing_of_the_rest_of_the_embedding_tool():
    for path, imported in _modules(PACKAGE / 'embed' / 'store').items():
        outside = sorted(m for m in imported if m.startswith('eva_open_clip.embed')
                         and not m.startswith('eva_open_clip.embed.store'))
        assert not outside, f'{path.relative_to(PACKAGE)} imports {outside}'


def test_nothing_but_the_command_line_imports_it():
    for path, imported in _modules(PACKAGE).items():
        if 'cli' in path.relative_to(PACKAGE).parts or path.name == '__main__.py':
            continue
        assert not [m for m in imported if m.startswith('eva_open_clip.cli')], path.relative_to(PACKAGE)


def test_the_command_line_is_thin():
    assert len((PACKAGE / 'cli' / '__init__.py').read_text().splitlines()) <= 150
