"""The model a tool runs, as one value: its name, its weights (a tag or a file), the device, the precision, int8
weights or not, compiled or not. Built where the user's words enter (the command line's shared options, or a
tool's Python call) by `ModelChoice.checked`, which checks every rule once; every layer below takes it whole
and trusts it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from eva_open_clip.errors import UsageError, param

DEFAULT_MODEL = 'EVA_CLIP_g_14'
# open_clip's precision names
PRECISIONS = ('fp32', 'fp16', 'bf16', 'pure_fp16', 'pure_bf16', 'amp', 'amp_bf16', 'amp_bfloat16')
QUANTIZE_CHOICES = ('none', 'int8')  # torchao's int8 weights ('none': full-precision weights)


@dataclass(frozen=True)
class ModelChoice:
    """A registered model, its weights and how it runs. `precision` None is the device's default (or what an
    output folder was made with); `quantize` None is none, or an output folder's; `device` None the default
    device (cuda when there is one), or a torchrun rank's."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    device: str | None = None
    precision: str | None = None
    quantize: str | None = None
    compile: bool = False

    @classmethod
    def checked(cls, model: str = DEFAULT_MODEL, pretrained: str | None = None, device: str | None = None,
                precision: str | None = None, quantize: str | None = None, compile: bool = False,
                device_known_later: bool = False) -> 'ModelChoice':
        """The choice, every rule checked here once: a registered model, a tag of it or a checkpoint file (the
        model's hub tag when not given), a precision open_clip knows, a quantization this torch can make, a
        device this machine has (unless `device_known_later`: a torchrun rank's, checked once known)."""
        from eva_open_clip.quantize import check as check_quantize
        from eva_open_clip.registry import check_model, resolve_pretrained
        from eva_open_clip.runtime.devices import check_device
        if precision is not None and precision not in PRECISIONS:
            raise UsageError(f"{param('precision', precision)}: choose from {', '.join(PRECISIONS)}")
        if quantize is not None and quantize not in QUANTIZE_CHOICES:
            raise UsageError(f"{param('quantize', quantize)}: choose from {', '.join(QUANTIZE_CHOICES)}")
        check_model(model)
        pretrained = resolve_pretrained(model, pretrained)
        if quantize not in (None, 'none'):
            check_quantize(quantize)
        if not device_known_later:
            check_device(device)
        return cls(model, pretrained, device, precision, quantize, compile)

    def but(self, **changes) -> 'ModelChoice':
        """The same choice with some settings resolved (a rank's device, the device's default precision)."""
        return dataclasses.replace(self, **changes)

    def resolved(self) -> 'ModelChoice':
        """The choice on its device (the default device when none), in the device's default precision where none
        was asked."""
        from eva_open_clip.runtime.devices import default_device, device_defaults
        device = self.device or default_device()
        return self.but(device=device, precision=self.precision or device_defaults(device).precision)

    @property
    def int8(self) -> str | None:
        """The quantization to make ('int8'), else None."""
        return None if self.quantize in (None, 'none') else self.quantize
