"""What an `embed` job is asked to do, checked before anything is imported, listed or loaded.

This module imports nothing heavy (no reader, no store), so that a mistake in the arguments is reported
at once."""
from __future__ import annotations

from dataclasses import dataclass, field

from eva_open_clip.embed.defaults import CAPTION_KEY, IMAGE_KEYS, MAX_IMAGE_PIXELS, MAX_RESIZED_PIXELS
from eva_open_clip.embed.ranks import Ranks
from eva_open_clip.errors import UsageError, param, switch

DEFAULT_MODEL = 'EVA_CLIP_g_14'
DEFAULT_PART_SIZE = 100_000
PRECISIONS = ('fp32', 'fp16', 'bf16', 'pure_fp16', 'pure_bf16', 'amp', 'amp_bf16', 'amp_bfloat16')
DECODE_MODES = ('exact', 'fast')
QUANTIZE_CHOICES = ('none', 'int8')


@dataclass
class EmbedOptions:
    """The arguments of `embed` (see its docstring); `check` refuses what cannot work, before any work."""

    inputs: tuple[str, ...]
    out: str
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    device: str | None = None
    precision: str | None = None  # None: the folder's, else the device's default (`devices.defaults_for`)
    batch_size: int | None = None  # None: the device's default
    decode: str | None = None  # None: the folder's, else the device's default
    compile: bool = False
    quantize: str | None = None  # None: the folder's, else no quantization ('none'); 'int8'
    workers: int | None = None
    stall_timeout: float = 1800.0  # seconds without a byte that make a remote read a failed one
    retries: int = 5  # more tries of a remote read after a transient failure, 1, 2, 4, ... seconds apart
    give_up: tuple[str, ...] = ()  # shards never read, given up on for good
    captions: bool = False
    files_from: str | None = None
    text_file: str | None = None
    part_size: int = DEFAULT_PART_SIZE
    image_keys: tuple[str, ...] = IMAGE_KEYS
    caption_key: str = CAPTION_KEY
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_resized_pixels: int = MAX_RESIZED_PIXELS
    progress_interval: float | None = None
    quiet: bool = False
    ranks: Ranks = field(default_factory=Ranks.from_env)

    @property
    def to_npy(self) -> bool:
        """Whether the output is one FILE.npy (else a folder)."""
        return self.out.endswith('.npy')

    def check(self) -> None:
        """Refuse arguments that cannot work together, and the model, tag and device this machine lacks."""
        if not self.inputs and not self.text_file and not self.files_from:
            raise UsageError(f"give images, folders, tar shards, {param('files_from', 'LIST')} or "
                             f"{param('text_file', 'FILE')}")
        for name in ('batch_size', 'part_size', 'max_image_pixels', 'max_resized_pixels'):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f'{param(name)} must be at least 1')
        for name, value, choices in (('precision', self.precision, PRECISIONS), ('decode', self.decode, DECODE_MODES),
                                     ('quantize', self.quantize, QUANTIZE_CHOICES)):
            if value is not None and value not in choices:
                raise UsageError(f"{param(name, value)}: choose from {', '.join(choices)}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"{param('workers')} must be 0 or more")
        if self.retries < 0:
            raise UsageError(f"{param('retries')} must be 0 or more")
        if not self.stall_timeout > 0:
            raise UsageError(f"{param('stall_timeout')} must be more than 0 seconds")
        from eva_open_clip.embed.remote import check_url, is_url
        for url in (arg for arg in self.inputs + self.give_up if is_url(arg)):
            check_url(url)
        if self.to_npy and self.ranks.world_size > 1:
            raise UsageError(f"{param('out', 'FILE.npy')} is written by one process: under torchrun give "
                             f"{param('out', 'DIR')}")
        if self.to_npy and self.captions:
            raise UsageError(f"{switch('captions')} writes the folder layout: give {param('out', 'DIR')}")
        if not self.to_npy and self.text_file:
            raise UsageError(f"{param('text_file')} writes one FILE.npy: give {param('out', 'FILE.npy')}")
        if self.text_file and (self.inputs or self.files_from):
            raise UsageError(f"{param('text_file')} embeds the lines of one file: give no images, folders or "
                             f"{param('files_from')}")
        from eva_open_clip.embed.devices import check_device
        from eva_open_clip.loading import check_model, resolve_pretrained
        check_model(self.model)
        self.pretrained = resolve_pretrained(self.model, self.pretrained)
        if self.quantize not in (None, 'none'):
            from eva_open_clip.quantize import check as check_quantize
            check_quantize(self.quantize)
        if self.ranks.world_size == 1:  # under torchrun each rank's device is checked once known
            check_device(self.device)
