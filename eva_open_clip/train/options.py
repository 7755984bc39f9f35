"""What a `train` run is asked to do: one list of options (`TrainOptions`), from which the Python call's keywords,
the command line's flags and the settings a run folder records are derived; checked before anything heavy is
imported or loaded (as `embed.options` does for `embed`)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from eva_open_clip.errors import UsageError, param
from eva_open_clip.runtime.choice import DEFAULT_MODEL, ModelChoice
from eva_open_clip.runtime.defaults import CAPTION_KEY, IMAGE_KEYS
from eva_open_clip.runtime.fields import add_flags, check_keywords, option
from eva_open_clip.runtime.ranks import Ranks

OPTIMIZERS = ('adamw', 'lamb')
TRAIN_PRECISIONS = ('fp32', 'amp', 'amp_bf16', 'amp_bfloat16', 'bf16', 'pure_bf16', 'fp16', 'pure_fp16')
MODEL_OPTIONS = ('model', 'pretrained', 'device', 'precision')
# what may change between a run and its resumption: how it is watched and saved, not what it computes
NOT_RECORDED = ('out', 'steps', 'save_every', 'val_data', 'val_every', 'workers', 'progress_interval', 'quiet',
                'save_released', 'device', 'plan', 'processes', 'memory')


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split(','))


RECIPE = 'the recipe (EVA-CLIP\'s: a rate and a layer decay per tower; docs/train.md gives each model\'s values)'
LORA = 'LoRA (peft): adapters on the attention and MLP matrices of both towers; only they train'
PLAN = 'memory plan'


@dataclass
class TrainOptions:
    """The arguments of `train` (see `eva_open_clip.train.train`); `check` refuses what cannot work."""

    train_data: tuple[str, ...] = option((), 'image-caption webdataset shards: paths, globs, brace patterns, '
                                             'https:// or pipe: URLs', nargs='+')
    out: str | None = option(None, 'the run folder (log.jsonl, checkpoints; the same command resumes it)')
    steps: int = option(None, 'optimizer steps (epochs roll over)', type=int)
    batch_size: int = option(32, 'pairs per step and process (of the processes the run started on; default: '
                                  '%(default)s)', type=int)
    lr: float = option(5e-5, 'base learning rate: the towers\' unless given, and logit_scale\'s '
                              '(default: %(default)s)', type=float, group=RECIPE)
    visual_lr: float | None = option(None, "the image tower's rate (default: --lr)", type=float, group=RECIPE)
    text_lr: float | None = option(None, "the text tower's rate (default: --lr)", type=float, group=RECIPE)
    visual_layer_decay: float = option(1.0, "the image tower's layer-wise rate decay (default: 1, none)",
                                        type=float, group=RECIPE)
    text_layer_decay: float = option(1.0, "the text tower's layer-wise rate decay (default: 1, none)",
                                      type=float, group=RECIPE)
    wd: float = option(0.05, 'weight decay, except 1-D tensors, biases and each tower\'s no_weight_decay() '
                              '(default: %(default)s)', type=float, group=RECIPE)
    warmup: int = option(0, 'linear warm-up steps, then cosine to 0 (default: %(default)s)', type=int, group=RECIPE)
    opt: str = option('adamw', "torch's AdamW or timm's LAMB, betas (0.9, 0.98), eps 1e-6 as EVA-CLIP's "
                                '(default: %(default)s)', choices=OPTIMIZERS, group=RECIPE)
    grad_clip_norm: float | None = option(None, 'clip the gradients to this norm (default: no clipping)',
                                           type=float, group=RECIPE)
    grad_checkpointing: bool = option(False, 'recompute activations in the backward pass (less memory)')
    fsdp: bool = option(False, "shard the weights, gradients and optimizer state across torchrun's processes "
                               '(FSDP2: block by block; sharded checkpoints)')
    lock_image: bool = option(False, 'freeze the image tower')
    lock_text: bool = option(False, 'freeze the text tower')
    lora: int | None = option(None, 'train LoRA adapters of this rank instead of the weights', type=int,
                               group=LORA, metavar='R')
    lora_alpha: float | None = option(None, 'LoRA scaling alpha (default: the rank)', type=float, group=LORA)
    lora_dropout: float = option(0.0, 'dropout on the adapters\' input (default: %(default)s)', type=float,
                                  group=LORA)
    plan: bool = option(False, "print each process's memory plan (weights, gradients, optimizer state, activations: "
                               'computed from the model built on the meta device; nothing is downloaded or read) and '
                               'whether it fits, then stop', group=PLAN)
    processes: int | None = option(None, "with --plan: the processes to plan for (default: this launch's)", type=int,
                                   group=PLAN, metavar='N')
    memory: float | None = option(None, "each process's device memory in GB, which the run's plan must fit (default: "
                                        "the device's; a run whose plan does not fit is refused)", type=float,
                                  group=PLAN, metavar='GB')
    workers: int | None = option(None, 'DataLoader workers decoding images, per process (default: the cores '
                                        'of the process; less two on a GPU)', type=int)
    seed: int = option(0, 'fixes the data order and the random initializations (default: %(default)s)', type=int)
    save_every: int = option(100, 'steps between checkpoints (default: %(default)s; one at the end too)', type=int)
    save_released: str | None = option(None, 'at the end, write the weights to this file in the released '
                                              "file's layout (LoRA merged)", metavar='FILE')
    val_data: tuple[str, ...] = option((), 'held-out image-caption shards: recall@1 both ways and the loss, '
                                            'every --val-every steps and at the end', nargs='+')
    val_every: int = option(100, 'steps between evaluations (default: %(default)s)', type=int)
    image_keys: tuple[str, ...] = option(IMAGE_KEYS, f"webdataset image keys (default: {','.join(IMAGE_KEYS)})",
                                          flag='image_key', type=_words)
    caption_key: str = option(CAPTION_KEY, 'webdataset caption key (default: %(default)s)')
    progress_interval: float | None = option(None, 'seconds between progress lines when standard error is not a '
                                                    'terminal (default: 30)', type=float)
    quiet: bool = option(False, 'no progress output')
    # the model: ModelChoice's settings (the command line's shared model options)
    model: str = option(DEFAULT_MODEL)
    pretrained: str | None = option(None)
    device: str | None = option(None)
    precision: str | None = option(None)  # None: bf16 autocast on a GPU, fp32 on the CPU

    @classmethod
    def from_call(cls, train_data: Any, keywords: Mapping[str, Any]) -> 'TrainOptions':
        import os
        check_keywords(cls, 'train', keywords, 'train_data')
        values = dict(keywords, train_data=[train_data] if isinstance(train_data, (str, os.PathLike)) else train_data)
        for name in ('train_data', 'val_data', 'image_keys'):
            if values.get(name) is not None:
                values[name] = tuple(map(str, values[name]))
        for name in ('out', 'save_released', 'pretrained'):
            if values.get(name) is not None:
                values[name] = str(values[name])
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> 'TrainOptions':
        return cls.from_call(args.train_data, {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                                               if f.name != 'train_data'})

    def recorded(self, **resolved: Any) -> dict[str, Any]:
        """The settings a run folder records (what a resumption must keep), with the values the run resolved."""
        values = {f.name: resolved.get(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name not in NOT_RECORDED}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def check(self, ranks: Ranks) -> ModelChoice:
        """Refuse what cannot work, before anything is loaded; the model choice, checked."""
        if not self.plan:
            if not self.train_data:
                raise UsageError(f"give {param('train_data', 'SHARDS')}")
            for needed in ('out', 'steps'):
                if getattr(self, needed) is None:
                    raise UsageError(f'give {param(needed)}')
        elif self.processes is not None and self.processes < 1:
            raise UsageError(f"{param('processes')} must be at least 1")
        if self.processes is not None and not self.plan:
            raise UsageError(f"{param('processes')} goes with {param('plan')} (a run has its launch's processes)")
        if self.memory is not None and not self.memory > 0:
            raise UsageError(f"{param('memory')} must be more than 0 (GB)")
        for name in ('steps', 'batch_size', 'save_every', 'val_every'):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f'{param(name)} must be at least 1')
        for name in ('lr', 'visual_lr', 'text_lr'):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise UsageError(f'{param(name)} must be more than 0')
        for name in ('visual_layer_decay', 'text_layer_decay'):
            if not 0 < getattr(self, name) <= 1:
                raise UsageError(f'{param(name)} must be more than 0 and at most 1')
        if self.wd < 0 or self.warmup < 0 or (self.workers is not None and self.workers < 0):
            bad = 'wd' if self.wd < 0 else 'warmup' if self.warmup < 0 else 'workers'
            raise UsageError(f'{param(bad)} must be 0 or more')
        if self.opt not in OPTIMIZERS:
            raise UsageError(f"{param('opt', self.opt)}: choose from {', '.join(OPTIMIZERS)}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise UsageError(f"{param('grad_clip_norm')} must be more than 0")
        if self.precision is not None and self.precision not in TRAIN_PRECISIONS:
            raise UsageError(f"{param('precision', self.precision)}: choose from {', '.join(TRAIN_PRECISIONS)}")
        if self.lora is not None:
            if self.lora < 1:
                raise UsageError(f"{param('lora', self.lora)}: the LoRA rank must be at least 1")
            if self.lora_alpha is not None and not self.lora_alpha > 0:
                raise UsageError(f"{param('lora_alpha', f'{self.lora_alpha:g}')}: the LoRA alpha must be more than 0")
            if not 0 <= self.lora_dropout < 1:
                raise UsageError(f"{param('lora_dropout')} must be at least 0 and less than 1")
            from eva_open_clip.train.lora import require_peft
            require_peft()
        elif self.lora_alpha is not None or self.lora_dropout:
            raise UsageError(f"{param('lora_alpha')} and {param('lora_dropout')} go with {param('lora', 'R')}")
        if self.fsdp and not self.plan:  # a plan is for the machines it names, whatever this one has
            from eva_open_clip import versions
            versions.require_torch(f"{param('fsdp')} (FSDP2)", versions.FSDP_TORCH)
            if not Ranks.launched():
                raise UsageError(f"{param('fsdp')} shards the model across the processes of a torchrun launch: run "
                                 'it under torchrun (torchrun --nproc-per-node N -m eva_open_clip train ...)')
        if self.lock_image and self.lock_text and self.lora is None:
            raise UsageError(f"{param('lock_image')} and {param('lock_text')} "
                             'leave nothing to train (but logit_scale): unlock a tower, or give --lora')
        from eva_open_clip.embed.remote import check_url, is_url
        for url in (arg for arg in self.train_data + self.val_data if is_url(arg)):
            check_url(url)
        if self.plan:  # the model's config is all a plan needs
            from eva_open_clip.registry import check_model
            from eva_open_clip.runtime.devices import check_device
            check_model(self.model)
            check_device(self.device)
            return ModelChoice(self.model, self.pretrained, self.device, None, None, False)
        return ModelChoice.checked(self.model, self.pretrained, self.device, None, None, False,
                                   device_known_later=ranks.world_size > 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`train`'s own flags, each from its option (the model options are the shared ones, added by the caller)."""
    add_flags(parser, TrainOptions, leave_out=MODEL_OPTIONS)
