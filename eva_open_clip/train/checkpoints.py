"""The run folder of `train`: one writer at a time (its lock, held by rank 0), `log.jsonl` and the checkpoint.

`log.jsonl`'s first line is the run's settings, its parameter counts and its number of data streams (the processes
it started on); a resumed run must have the same settings (what is watched or saved may change: the steps, how
often it saves and evaluates, the workers) and may run on another number of processes (`data.Share`). A resumed
run cuts the log back to the checkpoint's step, so that every step is logged once.

The checkpoint holds the weights, the optimizer's and the scheduler's state, where each data stream stands, each
process's random state, and is written whole or not at all, a torn save never replacing a good one:
- `checkpoint.pt` (a single process, or DDP): written by rank 0 (temporary file, fsync, rename);
- with `--fsdp`, `checkpoint/step-N/`: every process writes its shards with torch's distributed checkpointing (a
  resumption on another number of processes reshards them, the optimizer state included), then rank 0 writes the
  rest (`run.pt`) and, last, the record `checkpoint.json` naming that folder; folders it does not name are torn
  saves of this tool's, removed by the next save.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from eva_open_clip.durable import write_atomic, write_text
from eva_open_clip.errors import ToolError, UsageError, param
from eva_open_clip.runtime.ranks import Ranks
from eva_open_clip.train.data import Position, Share

LOG, CHECKPOINT = 'log.jsonl', 'checkpoint.pt'
SHARDED, RECORD, REST = 'checkpoint', 'checkpoint.json', 'run.pt'
FORMAT = 1


class RunFolder:
    """A run's folder: its settings checked (rank 0), its log appended (rank 0), its checkpoints saved and read."""

    def __init__(self, out: Path, settings: dict[str, Any], params: dict[str, int], ranks: Ranks, sharded: bool):
        self.out, self.ranks, self.sharded = out, ranks, sharded
        self.first = dict(settings=settings, params=params, world_size=ranks.world_size, format=FORMAT)
        self.log_path, self.checkpoint_path = out / LOG, out / CHECKPOINT
        failure, streams = None, ranks.world_size
        if ranks.rank == 0:
            try:
                streams = self._check()
            except UsageError as e:
                failure = e
        failure, self.streams = ranks.share((failure, streams))
        if failure is not None:
            raise failure
        self.share = Share.of(ranks.rank, ranks.world_size, self.streams, settings['batch_size'])

    def _check(self) -> int:
        """The run's number of data streams, once its settings are checked (rank 0)."""
        if not self.log_path.exists():
            if any(p.name not in ('.lock',) for p in self.out.iterdir()):
                raise UsageError(f'{self.out} is not empty and holds no run ({LOG}): give a new or empty '
                                 f'{param("out")} folder')
            write_text(self.log_path, json.dumps(self.first) + '\n')
            return self.ranks.world_size
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
        streams = int(found.get('world_size', 1))  # the processes it started on
        Share.of(0, self.ranks.world_size, streams, ours['batch_size'])  # refuses a number it cannot resume on
        return streams

    def resume(self, model, optimizer, scheduler) -> tuple[int, list[Position]]:
        """The step and the positions of this process's streams to go on from (0 and the starts for a new run), with
        the model, optimizer, scheduler and random state as the last checkpoint left them; the log cut back to that
        step."""
        if self.sharded:
            state = self._load_sharded(model, optimizer)
        else:
            state = self._load_whole(model, optimizer)
        if state is None:
            return 0, [Position() for _ in self.share.streams]
        scheduler.load_state_dict(state['scheduler'])
        if len(state['rng']) == self.ranks.world_size:  # on another number of processes, the seed's state
            torch.set_rng_state(state['rng'][self.ranks.rank])
        if self.ranks.rank == 0:
            self._cut_log(state['step'])
        return state['step'], [Position(**state['positions'][s]) for s in self.share.streams]

    def _load_whole(self, model, optimizer) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        try:
            state = torch.load(self.checkpoint_path, map_location='cpu', weights_only=True)
        except Exception as e:  # damaged: its rename made it whole, so this is not ours
            raise ToolError(f'{self.checkpoint_path} cannot be read ({type(e).__name__}): move it away to start '
                            'over') from None
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        return state

    def _load_sharded(self, model, optimizer) -> dict[str, Any] | None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        record = self.out / RECORD
        if not record.exists():
            return None
        folder = self.out / SHARDED / json.loads(record.read_text(encoding='utf-8'))['folder']
        try:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            tensors = dict(model=model_state, optimizer=optimizer_state)
            dcp.load(tensors, checkpoint_id=str(folder))
            rest = torch.load(folder / REST, map_location='cpu', weights_only=True)
        except Exception as e:
            raise ToolError(f'{folder} cannot be read ({type(e).__name__}: {str(e)[:200]}): move {record} away to '
                            'start over') from None
        set_state_dict(model, optimizer, model_state_dict=tensors['model'], optim_state_dict=tensors['optimizer'])
        return rest

    def _cut_log(self, step: int) -> None:
        lines = self.log_path.read_text(encoding='utf-8').splitlines()
        kept = [lines[0]] + [line for line in lines[1:] if json.loads(line).get('step', 0) <= step]
        if len(kept) != len(lines):
            write_text(self.log_path, '\n'.join(kept) + '\n')

    def log(self, record: dict[str, Any]) -> None:
        if self.ranks.rank == 0:
            with open(self.log_path, 'a', encoding='utf-8') as f:
                f.write(json.dumps(record) + '\n')

    def save(self, step: int, model, optimizer, scheduler, positions: list[Position]) -> None:
        """Write the checkpoint of `step`, with every stream's position and every process's random state (a
        collective)."""
        shared = self.ranks.gather({s: p.as_json() for s, p in zip(self.share.streams, positions)})
        streams = {s: p for part in shared for s, p in part.items()}
        rest = dict(step=step, scheduler=scheduler.state_dict(), positions=[streams[s] for s in range(self.streams)],
                    rng=self.ranks.gather(torch.get_rng_state()), format=FORMAT)
        if self.sharded:
            self._save_sharded(step, model, optimizer, rest)
        elif self.ranks.rank == 0:
            state = dict(rest, model=model.state_dict(), optimizer=optimizer.state_dict())
            write_atomic(self.checkpoint_path, lambda p: torch.save(state, p))

    def _save_sharded(self, step: int, model, optimizer, rest: dict[str, Any]) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        name = f'step-{step:08d}'
        folder = self.out / SHARDED / name
        if self.ranks.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # a torn save of this step (never the recorded one)
            folder.mkdir(parents=True)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save(dict(model=model_state, optimizer=optimizer_state), checkpoint_id=str(folder))  # fsyncs its files
        if self.ranks.rank == 0:
            write_atomic(folder / REST, lambda p: torch.save(rest, p))
            write_text(self.out / RECORD, json.dumps(dict(step=step, folder=name, format=FORMAT)) + '\n')
            for old in (self.out / SHARDED).iterdir():
                if old.name != name and old.name.startswith('step-'):
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
