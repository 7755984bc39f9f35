"""`eva-open-clip run`: run an existing tool (a module or a script) with the EVA models registered."""
from __future__ import annotations

import importlib.util
import runpy
import sys
from typing import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

USAGE = 'eva-open-clip run [--register NAME=CONFIG.json ...] (-m MODULE | SCRIPT) [ARGS ...]'


class _CpuDeviceIdsDDP(DistributedDataParallel):
    """DDP that accepts `device_ids=[cpu]`, as open_clip_train passes when training on CPU.

    torch only allows `device_ids=None` for CPU modules; open_clip_train's `main` always passes the
    training device, so its CPU (gloo) distributed path fails without this. GPU use is unchanged.
    """

    def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):
            device_ids, output_device = None, None
        super().__init__(module, device_ids, output_device, *args, **kwargs)


def run_target(argv: Sequence[str]) -> None:
    """Run a module (`-m MODULE`) or script as `__main__`, with the EVA models registered.

    `--register NAME=CONFIG.json` (repeatable, before the target) also registers custom EVA-CLIP
    configs. Arguments after the target reach it untouched; its exit code (SystemExit) passes through.
    """
    from .registry import register_eva_model
    argv = list(argv)
    while len(argv) >= 2 and argv[0] == '--register':
        name, sep, config = argv[1].partition('=')
        if not sep:
            raise SystemExit(f'eva-open-clip run: --register takes NAME=CONFIG.json, got {argv[1]!r}')
        register_eva_model(name, config)
        argv = argv[2:]
    torch.nn.parallel.DistributedDataParallel = _CpuDeviceIdsDDP
    if len(argv) >= 2 and argv[0] == '-m':
        module, rest = argv[1], argv[2:]
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f'eva-open-clip run: no module named {module!r}')
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name='__main__', alter_sys=True)
    elif argv and not argv[0].startswith('-'):
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name='__main__')
    else:
        print(f'usage: {USAGE}', file=sys.stderr)
        raise SystemExit(2)
