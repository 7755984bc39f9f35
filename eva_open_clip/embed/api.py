"""`embed`: the embedding tool as one call, the same from a notebook as from `eva-open-clip embed`.

Its arguments are checked before anything heavy is imported or any input is listed; then the job runs on
this process, or on each rank of a torchrun launch (the process group started and stopped here), stopping
cleanly on SIGTERM and SIGINT (`Interrupted`, leaving an output folder resumable). What it did is said on
standard error at the end; a job that could not embed everything it was given raises a `ToolError` after
saying it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from eva_open_clip.embed.options import EmbedOptions
from eva_open_clip.errors import ToolError, param
from eva_open_clip.runtime.choice import ModelChoice
from eva_open_clip.runtime.fields import call_signature
from eva_open_clip.runtime.progress import plural
from eva_open_clip.runtime.ranks import Ranks
from eva_open_clip.runtime.signals import Interrupted, stop_on_signals


@dataclass
class EmbedResult:
    """What a job wrote: its output, the rows there, the samples skipped by reason, and (folder output) the
    folder's summary (`summary.json`)."""

    out: Path
    rows: int
    skipped_by_reason: dict[str, int]
    summary: object | None = None


def embed(inputs: Sequence[str | os.PathLike] | str | os.PathLike = (), **options) -> EmbedResult | None:
    """Embed image files, folders, `files_from` lists and webdataset tar shards (paths, globs, brace patterns,
    URLs), or the lines of `text_file`, into `out`: a folder (resumable; see docs/embed-folder.md) or one
    FILE.npy with FILE.paths.txt. Returns what was written (None on the ranks other than 0 of a torchrun job).

    The options are those of `eva-open-clip embed` (docs/command-line.md), named as its flags are (the list:
    `eva_open_clip.embed.options.EmbedOptions`). `precision`, `batch_size` and `decode` left as None are the
    device's defaults (bf16, 256 and fast on a GPU; fp32, 32 and exact on the CPU), except that a folder resumed
    keeps the precision and decoding its rows were made with. A remote read with no byte for `stall_timeout`
    seconds fails; a failed read is tried `retries` more times, 1, 2, 4, ... seconds apart; the shards `give_up`
    names are given up on for good.
    """
    return run_embed(EmbedOptions.from_call(inputs, options))


embed.__signature__ = call_signature(embed, EmbedOptions, 'inputs', ('out',))


def run_embed(options: EmbedOptions) -> EmbedResult | None:
    """The job of `options` (see `embed`), checked first, stopping cleanly on SIGTERM and SIGINT."""
    ranks = Ranks.from_env()
    choice = options.check(ranks)
    with stop_on_signals():
        return _to_npy(options, choice) if options.to_npy else _to_folder(options, choice, ranks)


@dataclass(frozen=True)
class _Run:
    """How this run works: the model choice with its device and precision resolved, and the options' batch size,
    decoding and workers, each the device's default (or the folder's setting) where not given."""

    choice: ModelChoice
    batch_size: int
    decode: str
    workers: int
    line: str  # what the run uses and why, said once its inputs are listed (on rank 0, unless quiet)

    @property
    def quantize(self) -> str:
        return self.choice.quantize or 'none'


def _run(options: EmbedOptions, choice: ModelChoice, ranks: Ranks, device: str | None,
         recorded: dict | None = None) -> _Run:
    """The run's settings: the options, else the folder's (`recorded`), else the device's defaults."""
    from eva_open_clip.embed.loader import default_workers
    from eva_open_clip.runtime.devices import default_device, device_defaults
    device = device or default_device()
    defaults = device_defaults(device)
    said = []

    def chosen(name: str, given, default, quiet_value=None):
        """The option, else the folder's value, else the default; said unless it is `quiet_value`."""
        why = ''
        if given is None and recorded is not None and name in recorded:
            given, why = recorded[name], f' (as {options.out} was made)'
        elif given is None:
            given, why = default, f' (the default on {defaults.why})'
        if given != quiet_value:
            said.append(f'{name} {given}{why}')
        return given

    precision = chosen('precision', choice.precision, defaults.precision)
    batch_size = chosen('batch_size', options.batch_size, defaults.batch_size)
    decode = chosen('decode', options.decode, defaults.decode)
    quantize = chosen('quantize', choice.quantize, 'none', quiet_value='none')
    workers = default_workers(ranks.local_world_size, _device_type(device)) if options.workers is None \
        else options.workers
    compiled = ', compiled' if choice.compile else ''
    line = f"embedding with {choice.model} on {device}: {', '.join(said)}, {plural(workers, 'worker')}{compiled}"
    return _Run(choice.but(device=device, precision=precision, quantize=quantize), batch_size, decode, workers, line)


def _device_type(device: str) -> str:
    import torch
    return torch.device(device).type


def _reading(options: EmbedOptions):
    from eva_open_clip.embed.job import Reading
    from eva_open_clip.embed.remote import RemoteOptions
    from eva_open_clip.runtime.decode import PixelLimits
    return Reading(options.image_keys, options.caption_key if options.captions else None,
                   PixelLimits(options.max_image_pixels, options.max_resized_pixels),
                   RemoteOptions(options.stall_timeout, options.retries))


def _loader(options: EmbedOptions, run: _Run, rank: int = 0):
    """What the job calls to load the model, once the inputs are listed: the run's line, then the encoder."""
    from eva_open_clip.runtime.encoder import load_encoder

    def load():
        if rank == 0 and not options.quiet:
            print(run.line, file=sys.stderr)
        return load_encoder(run.choice, run.batch_size, run.decode)
    return load


def _to_npy(options: EmbedOptions, choice: ModelChoice) -> EmbedResult:
    from eva_open_clip.embed.npy_job import embed_to_npy
    from eva_open_clip.embed.report import reasons_of, skipped_text, warn_skipped
    from eva_open_clip.embed.store.npy_file import paths_file
    run = _run(options, choice, Ranks(), choice.device)
    rows, skipped = embed_to_npy(
        _loader(options, run), options.inputs, options.out, batch_size=run.batch_size, text_file=options.text_file,
        files_from=options.files_from, workers=run.workers, quiet=options.quiet,
        progress_interval=options.progress_interval, give_up=options.give_up, reading=_reading(options))
    warn_skipped(skipped)
    reasons = reasons_of(skipped)
    out = Path(options.out)
    print(f'embedded {plural(rows, "sample")} into {out} and {paths_file(out)} ({skipped_text(reasons)})',
          file=sys.stderr)
    return EmbedResult(out, rows, reasons)


def _to_folder(options: EmbedOptions, choice: ModelChoice, ranks: Ranks) -> EmbedResult | None:
    """The folder layout, on one process or on every rank of a torchrun/srun launch."""
    from eva_open_clip.embed.folder_job import embed_folder
    from eva_open_clip.embed.report import rate_text, skipped_text
    from eva_open_clip.embed.store.folder import FolderSettings, done_count, recorded_settings
    from eva_open_clip.embed.units import read_units
    out = Path(options.out)
    with ranks.process_group(choice.device) as device:
        run = _run(options, choice, ranks, device, recorded_settings(out))
        settings = FolderSettings(options.recorded(pretrained=run.choice.pretrained, precision=run.choice.precision,
                                                   decode=run.decode, quantize=run.quantize))
        try:
            summary = embed_folder(_loader(options, run, ranks.rank), settings, _reading(options), options.inputs,
                                   options.files_from, out, run.workers, run.batch_size, ranks,
                                   progress_interval=options.progress_interval, quiet=options.quiet,
                                   give_up=options.give_up)
        except Interrupted as e:
            if ranks.rank != 0:
                raise Interrupted(e.signum, '') from None
            units = read_units(out) or []
            raise Interrupted(e.signum, f'interrupted after {done_count(out) if units else 0} of '
                                        f'{plural(len(units), "unit")}; run the same command to resume') from None
    if summary is None:
        return None
    print(f"embedded {plural(summary.rows, 'sample')} of {plural(summary.units, 'unit')} into {out} "
          f"({skipped_text(summary.skipped_by_reason)}); this run: "
          f"{plural(sum(r.rows for r in summary.ranks), 'sample')} on {plural(ranks.world_size, 'rank')}"
          f"{rate_text(summary.ranks)}", file=sys.stderr)
    unreadable = [u for r in summary.ranks for u in r.unreadable]
    if unreadable:
        raise ToolError(f"{plural(len(unreadable), 'shard')} could not be read, e.g. {unreadable[0].source}: "
                        f"{unreadable[0].detail} (a shard lost for good: {param('give_up', 'SHARD')}); they are not "
                        f"marked done: run the same command to try them again")
    if summary.rows == 0:
        raise ToolError('no sample could be embedded' + (
            f" ({skipped_text(summary.skipped_by_reason)}; check {param('image_keys', flag='image_key')} and "
            f"{param('caption_key')})"
            if summary.skipped else ''))
    return EmbedResult(out, summary.rows, summary.skipped_by_reason, summary)
