"""The layers of the package import one way: the plugin; the runtime between it and the tools; the tools (embed,
deploy, classify) on the runtime; the command line on top. The store never imports the rest of the embedding
tool, and no module imports itself back through others, at module level or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / 'eva_open_clip'
TOOLS = ('embed', 'deploy', 'classify', 'train')


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _imports(path: Path) -> set[str]:
    """The package's modules that `path` imports, at any depth of its code (relative imports resolved; `from
    package import module` is an import of that module, not of the package's __init__)."""
    here = _module_name(path)
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
            for alias in node.names:
                found.add(f'{base}.{alias.name}' if f'{base}.{alias.name}' in MODULES else base)
    return {m for m in found if m in MODULES and m != here}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split('.')
    if len(parts) == 1:
        return 'plugin'
    if parts[1] == 'cli' or parts[1] == '__main__':
        return 'cli'
    if parts[1] in TOOLS:
        return 'tools'
    if parts[1] == 'runtime':
        return 'runtime'
    return 'plugin'


ORDER = ['plugin', 'runtime', 'tools', 'cli']


def test_each_layer_imports_only_the_layers_below_it():
    upward = [(m, i) for m, imported in GRAPH.items() for i in imported
              if ORDER.index(_layer(i)) > ORDER.index(_layer(m))]
    assert not upward, upward


def test_no_module_imports_itself_back_through_others():
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == 1:
                cycle = path[path.index(imported):] + [imported]
                raise AssertionError(' -> '.join(cycle))
            if imported not in state:
                walk(imported, path + [imported])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module, [module])


def test_the_check_sees_imports_inside_functions():
    # loading asks the converter which model a file fits from inside a function
    assert 'eva_open_clip.convert' in GRAPH['eva_open_clip.runtime.loading']
    assert _layer('eva_open_clip.embed.api') == 'tools' and _layer('eva_open_clip.runtime.encoder') == 'runtime'


def test_the_store_imports_nothing_of_the_rest_of_the_embedding_tool():
    for module, imported in GRAPH.items():
        if module.startswith('eva_open_clip.embed.store'):
            outside = sorted(m for m in imported if m.startswith('eva_open_clip.embed')
                             and not m.startswith('eva_open_clip.embed.store'))
            assert not outside, f'{module} imports {outside}'


def test_the_command_line_is_thin():
    assert len((PACKAGE / 'cli' / '__init__.py').read_text().splitlines()) <= 150
