"""What an `embed` job is asked to do: one list of options (`EmbedOptions`), from which the Python call's keywords
(`embed.api.embed`), the command line's flags (`add_arguments`) and the settings an output folder records
(`recorded`) are all derived; checked (`check`) before anything is imported, listed or loaded.

A field's metadata says how the command line spells it (`flag`, argparse keywords, help) and whether an output
folder records it (the settings that determine its rows, see `store.folder.FolderSettings`). The model options
are the `ModelChoice`'s, spelled by the command line's shared model options.

This module imports nothing heavy (no reader, no store), so that a mistake in the arguments is reported
at once."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from eva_open_clip.errors import UsageError, param, switch
from eva_open_clip.runtime.choice import DEFAULT_MODEL, ModelChoice
from eva_open_clip.runtime.defaults import CAPTION_KEY, IMAGE_KEYS, MAX_IMAGE_PIXELS, MAX_RESIZED_PIXELS
from eva_open_clip.runtime.fields import add_flags, check_keywords, option
from eva_open_clip.runtime.ranks import Ranks

DEFAULT_PART_SIZE = 100_000
DECODE_MODES = ('exact', 'fast')
MODEL_OPTIONS = tuple(f.name for f in dataclasses.fields(ModelChoice))  # the command line's shared model options


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split(','))


REMOTE = 'remote shards (http(s):// and pipe:COMMAND)'


@dataclass
class EmbedOptions:
    """The arguments of `embed` (see its docstring); `check` refuses what cannot work, before any work."""

    inputs: tuple[str, ...] = option((), 'image files, folders, .tar shards, globs or brace patterns', nargs='*')
    out: str | None = option(None, 'output FILE.npy, or a folder', required=True)
    captions: bool = option(False, "also embed each sample's caption (folder output)", recorded=True)
    files_from: str | None = option(None, 'a file with one image path per line')
    text_file: str | None = option(None, 'embed the lines of this file instead of images')
    workers: int | None = option(None, 'DataLoader workers decoding images (default: the available cores, per rank; '
                                        'less two on a GPU, for the main process and its pinning thread)', type=int)
    batch_size: int | None = option(None, '(default: 256 on a GPU, 32 on the CPU)', type=int)
    decode: str | None = option(
        None, "exact: open_clip's own preprocessing; fast: JPEGs decoded at reduced scale (never below twice the "
              "model's size) and resized in torch, a few pixel levels and about 1e-3 of a feature away (default: "
              'fast on a GPU, exact on the CPU; a resumed folder keeps its own)', recorded=True, choices=DECODE_MODES)
    part_size: int = option(DEFAULT_PART_SIZE, 'rows per output part in a folder (default: %(default)s)',
                             recorded=True, type=int)
    image_keys: tuple[str, ...] = option(
        IMAGE_KEYS, f"webdataset image keys, comma-separated, first found wins (default: {','.join(IMAGE_KEYS)})",
        recorded=True, flag='image_key', type=_words)
    caption_key: str = option(CAPTION_KEY, 'webdataset caption key (default: %(default)s)', recorded=True)
    max_image_pixels: int = option(
        MAX_IMAGE_PIXELS, 'skip (reason image_too_large) an image of more pixels, found from its header before '
                          "decoding (default: %(default)s, PIL's decompression-bomb guard)", recorded=True, type=int)
    max_resized_pixels: int = option(
        MAX_RESIZED_PIXELS, "skip (reason image_too_large) an image whose short side resized to the model's image "
                            'size gives more pixels (default: %(default)s: aspect ratios up to about 330:1 at 224 '
                            'px)', recorded=True, type=int)
    stall_timeout: float = option(1800.0, 'seconds without a byte after which a read fails (default: %(default)s)',
                                   group=REMOTE, type=float)
    retries: int = option(5, 'more tries of a read that failed for a reason that may pass (a 503, a cut connection, '
                              'a stall, an error page), 1, 2, 4, ... seconds apart (default: %(default)s)',
                           group=REMOTE, type=int)
    give_up: tuple[str, ...] = option(
        (), 'give up for good on a shard that cannot be read, as listed (repeatable): recorded with no rows in '
            'summary.json, so that the job can finish', group=REMOTE, action='append', metavar='SHARD')
    progress_interval: float | None = option(
        None, 'seconds between progress lines when standard error is not a terminal (default: 30)', type=float)
    quiet: bool = option(False, 'no progress output (errors and the final line remain)')
    # the model: ModelChoice's settings (the command line's shared model options)
    model: str = option(DEFAULT_MODEL, recorded=True)
    pretrained: str | None = option(None, recorded=True)
    device: str | None = option(None)
    precision: str | None = option(None, recorded=True)  # None: the folder's, else the device's default
    quantize: str | None = option(None, recorded=True)  # None: the folder's, else none ('none')
    compile: bool = option(False)

    @classmethod
    def from_call(cls, inputs: Any, keywords: Mapping[str, Any]) -> 'EmbedOptions':
        """The options of a Python call: `inputs` one path or many, each keyword a field (a misspelled one is
        refused naming the closest)."""
        import os
        check_keywords(cls, 'embed', keywords, 'inputs')
        if 'out' not in keywords:
            raise UsageError(f"give {param('out', 'FILE.npy')} or {param('out', 'DIR')}")
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        values = dict(keywords, inputs=inputs)
        for name in ('inputs', 'give_up', 'image_keys'):
            if name in values:
                values[name] = tuple(map(str, values[name]))
        for name in ('out', 'files_from', 'text_file'):
            if values.get(name) is not None:
                values[name] = str(values[name])
        if 'stall_timeout' in values:
            values['stall_timeout'] = float(values['stall_timeout'])
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> 'EmbedOptions':
        """The options of a parsed command line (see `add_arguments`)."""
        return cls.from_call(args.inputs, {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                                           if f.name != 'inputs'})

    @property
    def to_npy(self) -> bool:
        """Whether the output is one FILE.npy (else a folder)."""
        return self.out.endswith('.npy')

    def recorded(self, **resolved: Any) -> dict[str, Any]:
        """The settings an output folder records (those that determine its rows), with `resolved` values (the
        precision, decoding and quantization a run resolved) in place of the options'."""
        values = {f.name: resolved.get(f.name, getattr(self, f.name))
                  for f in dataclasses.fields(self) if f.metadata['recorded']}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def check(self, ranks: Ranks) -> ModelChoice:
        """Refuse arguments that cannot work together, and the model, tag and device this machine lacks; the
        model choice, checked."""
        if not self.inputs and not self.text_file and not self.files_from:
            raise UsageError(f"give images, folders, tar shards, {param('files_from', 'LIST')} or "
                             f"{param('text_file', 'FILE')}")
        for name in ('batch_size', 'part_size', 'max_image_pixels', 'max_resized_pixels'):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f'{param(name)} must be at least 1')
        if self.decode is not None and self.decode not in DECODE_MODES:
            raise UsageError(f"{param('decode', self.decode)}: choose from {', '.join(DECODE_MODES)}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"{param('workers')} must be 0 or more")
        if self.retries < 0:
            raise UsageError(f"{param('retries')} must be 0 or more")
        if not self.stall_timeout > 0:
            raise UsageError(f"{param('stall_timeout')} must be more than 0 seconds")
        from eva_open_clip.embed.remote import check_url, is_url
        for url in (arg for arg in self.inputs + self.give_up if is_url(arg)):
            check_url(url)
        if self.to_npy and ranks.world_size > 1:
            raise UsageError(f"{param('out', 'FILE.npy')} is written by one process: under torchrun give "
                             f"{param('out', 'DIR')}")
        if self.to_npy and self.captions:
            raise UsageError(f"{switch('captions')} writes the folder layout: give {param('out', 'DIR')}")
        if not self.to_npy and self.text_file:
            raise UsageError(f"{param('text_file')} writes one FILE.npy: give {param('out', 'FILE.npy')}")
        if self.text_file and (self.inputs or self.files_from):
            raise UsageError(f"{param('text_file')} embeds the lines of one file: give no images, folders or "
                             f"{param('files_from')}")
        # under torchrun each rank's device is checked once known
        return ModelChoice.checked(**{name: getattr(self, name) for name in MODEL_OPTIONS},
                                   device_known_later=ranks.world_size > 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`embed`'s own flags, each from its option (the model options are the shared ones, added by the caller)."""
    add_flags(parser, EmbedOptions, leave_out=MODEL_OPTIONS, positional='inputs')
