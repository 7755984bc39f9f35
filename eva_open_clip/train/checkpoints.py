"""The run folder of `train`: one writer at a time (its lock, held by rank 0), `log.jsonl` and `checkpoint.pt`.

`log.jsonl`'s first line is the run's settings and parameter counts; a resumed run must have the same settings
(what is watched or saved may change: the steps, how often it saves and evaluates, the workers). `checkpoint.pt`
is written whole or not at all (temporary file, fsync, rename): a torn save never replaces a good one. A resumed
run cuts the log back to the checkpoint's step, so that every step is logged once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from eva_open_clip.durable import write_atomic, write_text
from eva_open_clip.errors import ToolError, UsageError, param
from eva_open_clip.runtime.ranks import Ranks
from eva_open_clip.train.data import Position

LOG, CHECKPOINT = 'log.jsonl', 'checkpoint.pt'
FORMAT = 1


class RunFolder:
    """A run's folder: its settings checked (rank 0), its log appended (rank 0), its checkpoints saved and read."""

    def __init__(self, out: Path, settings: dict[str, Any], params: dict[str, int], ranks: Ranks):
        self.out, self.ranks = out, ranks
        self.first = dict(settings=settings, params=params, world_size=ranks.world_size, format=FORMAT)
        self.log_path, self.checkpoint_path = out / LOG, out / CHECKPOINT
        failure = None
        if ranks.rank == 0:
            try:
                self._check()
            except UsageError as e:
                failure = e
        failure = ranks.share(failure)
        if failure is not None:
            raise failure

    def _check(self) -> None:
        if not self.log_path.exists():
            if any(p.name not in ('.lock',) for p in self.out.iterdir()):
                raise UsageError(f'{self.out} is not empty and holds no run ({LOG}): give a new or empty '
                                 f'{param("out")} folder')
            write_text(self.log_path, json.dumps(self.first) + '\n')
            return
        try:
            found = json.loads(self.log_path.read_text(encoding='utf-8').splitlines()[0])
        except (ValueError, IndexError):
            raise UsageError(f'{self.log_path} is not the log of a run of this tool: give a new {param("out")} '
                             'folder') from None
        theirs, ours = found.get('settings', {}), self.first['settings']
        differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        if differ:
            detail = '; '.join(f'{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now' for k in differ[:4])
            raise UsageError(f'{self.out} holds another run ({detail}): give its settings to resume it, or a new '
                             f'{param("out")} folder')
        if found.get('world_size') != self.ranks.world_size:
            raise UsageError(f"{self.out} was trained by {found.get('world_size')} process(es): resume it with as "
                             f'many (this launch has {self.ranks.world_size})')

    def resume(self, model, optimizer, scheduler) -> tuple[int, Position]:
        """The step and this rank's data position to go on from (0 and the start for a new run), with the model,
        optimizer, scheduler and random state as the last checkpoint left them; the log cut back to that step."""
        if not self.checkpoint_path.exists():
            return 0, Position()
        try:
            state = torch.load(self.checkpoint_path, map_location='cpu', weights_only=True)
        except Exception as e:  # damaged: its rename made it whole, so this is not ours
            raise ToolError(f'{self.checkpoint_path} cannot be read ({type(e).__name__}): move it away to start '
                            'over') from None
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        torch.set_rng_state(state['rng'][self.ranks.rank])
        if self.ranks.rank == 0:
            self._cut_log(state['step'])
        return state['step'], Position(**state['positions'][self.ranks.rank])

    def _cut_log(self, step: int) -> None:
        lines = self.log_path.read_text(encoding='utf-8').splitlines()
        kept = [lines[0]] + [line for line in lines[1:] if json.loads(line).get('step', 0) <= step]
        if len(kept) != len(lines):
            write_text(self.log_path, '\n'.join(kept) + '\n')

    def log(self, record: dict[str, Any]) -> None:
        if self.ranks.rank == 0:
            with open(self.log_path, 'a', encoding='utf-8') as f:
                f.write(json.dumps(record) + '\n')

    def save(self, step: int, model, optimizer, scheduler, position: Position) -> None:
        """Write the checkpoint of `step` (rank 0, with every rank's data position and random state)."""
        positions = self.ranks.gather(position.as_json())
        rngs = self.ranks.gather(torch.get_rng_state())
        if self.ranks.rank != 0:
            return
        state = dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), positions=positions, rng=rngs, format=FORMAT)
        write_atomic(self.checkpoint_path, lambda p: torch.save(state, p))
