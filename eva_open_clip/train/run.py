"""`train`: fine-tuning as one call, the same from a notebook as from `eva-open-clip train`, on one process or on
each rank of a torchrun launch (DDP; gloo on the CPU, NCCL on GPUs).

The run folder `--out RUN` holds `log.jsonl` (its first line the settings and the parameter counts, then a line
per step and per evaluation) and `checkpoint.pt` (the weights, the optimizer's and the scheduler's state, where
each rank stands in its data stream, each rank's random state), written every `--save-every` steps whole or not
at all. Running the same command again continues from the checkpoint to the weights an uninterrupted run ends
with: the data order is fixed by the seed alone (`data`), whatever the number of decoding workers.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from eva_open_clip.errors import ToolError, UsageError, param
from eva_open_clip.runtime.choice import ModelChoice
from eva_open_clip.runtime.fields import call_signature
from eva_open_clip.runtime.progress import plural
from eva_open_clip.runtime.ranks import Ranks
from eva_open_clip.runtime.signals import Interrupted, stop_on_signals
from eva_open_clip.train.options import TrainOptions
from eva_open_clip.train.plan import Plan, Setup

BETAS, EPS = (0.9, 0.98), 1e-6  # EVA-CLIP's


@dataclass
class TrainResult:
    """What a run did: its folder, the steps done, the last step's loss, the last evaluation, the released file."""

    out: Path
    steps: int
    loss: float
    val: dict | None = None
    released: Path | None = None


def train(train_data: Sequence[str | os.PathLike] | str | os.PathLike = (), **options) -> TrainResult | Plan | None:
    """Fine-tune a registered model on image-caption shards, into the run folder `out` (see the module doc); the
    options are `eva-open-clip train`'s, named as its flags are (`eva_open_clip.train.options.TrainOptions`).
    Returns what was done (None on the ranks other than 0 of a torchrun job), or with `plan=True` the memory plan
    (`eva_open_clip.train.plan`; `print` it), having loaded nothing."""
    return run_train(TrainOptions.from_call(train_data, options))


train.__signature__ = call_signature(train, TrainOptions, 'train_data', ())


def run_train(options: TrainOptions) -> TrainResult | Plan | None:
    """The run of `options`, checked first, stopping cleanly on SIGTERM and SIGINT (resumable); or its plan."""
    ranks = Ranks.from_env()
    choice = options.check(ranks)
    if options.plan:
        from eva_open_clip.train.plan import plan
        return plan(*memory_setup(options, choice, ranks))
    try:
        with stop_on_signals(), ranks.process_group(choice.device, alone_too=options.fsdp) as device:
            return _Job(options, choice.but(device=device), ranks).run()
    except Interrupted as e:
        said = f'interrupted: run the same command to resume {options.out} from its last checkpoint'
        raise Interrupted(e.signum, said if ranks.rank == 0 else '') from None


def memory_setup(options: TrainOptions, choice: ModelChoice, ranks: Ranks) -> tuple[Setup, float, str]:
    """What the memory plan of a run is for: its setup, and the memory each process has (`--memory`, else its
    device's) and where."""
    from eva_open_clip.runtime.devices import default_device
    from eva_open_clip.train.plan import GB, device_memory
    device = torch.device(choice.device or default_device())
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', ranks.local_rank if ranks.local_world_size <= torch.cuda.device_count() else 0)
    setup = Setup(choice.model, options.processes or ranks.world_size, options.batch_size,
                  options.precision or default_precision(device), options.fsdp, options.lora,
                  options.grad_checkpointing, options.lock_image, options.lock_text)
    if options.memory is not None:
        return setup, options.memory * GB, f"in {param('memory', f'{options.memory:g}')}"
    return (setup, *device_memory(device, ranks.local_world_size))


def default_precision(device: torch.device) -> str:
    """bf16 autocast on a GPU with bf16 tensor cores (fp16 autocast on older ones), fp32 elsewhere."""
    from eva_open_clip.runtime.devices import has_fast_bf16
    if device.type != 'cuda':
        return 'fp32'
    return 'amp_bf16' if has_fast_bf16(device) else 'amp'


def schedule(warmup: int, steps: int):
    """Each group's rate as a factor of its own: linear warm-up over `warmup` steps, then cosine to 0 (open_clip's
    and EVA-CLIP's shape)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))
    return factor


class _Job:
    def __init__(self, options: TrainOptions, choice: ModelChoice, ranks: Ranks):
        from eva_open_clip.runtime.devices import default_device
        self.options, self.ranks = options, ranks
        self.device = torch.device(choice.device or default_device())
        self.precision = options.precision or default_precision(self.device)
        self.choice = choice.but(device=str(self.device), precision=self.precision)
        self.out = Path(options.out)

    def run(self) -> TrainResult | None:
        from eva_open_clip.embed.store.lock import OutputLock
        self._check_memory()  # before the run folder is made
        if self.device.type == 'cpu':  # what a step frees goes back, so that a process holds what its plan says
            from eva_open_clip.cpu_memory import return_large_blocks
            return_large_blocks()
        lock = OutputLock.for_folder(self.out)
        try:
            if self.ranks.rank == 0:
                self.out.mkdir(parents=True, exist_ok=True)
                lock.acquire()
            return self._run()
        finally:
            lock.release()

    def _run(self) -> TrainResult | None:
        from eva_open_clip.embed.units import list_units
        from eva_open_clip.train.checkpoints import RunFolder
        options, ranks = self.options, self.ranks
        units, listing = list_units(options.train_data, None, 10_000)
        if not units:
            raise UsageError(f"{param('train_data')}: the inputs hold no shard")
        val_units = list_units(options.val_data, None, 10_000)[0] if options.val_data else []
        template = self._released_template()
        model, preprocess, tokenizer = self._model()
        if options.fsdp:
            from eva_open_clip.train.fsdp import shard
            shard(model, self.precision)
        groups = self._groups(model)
        trainable = sum(p.numel() for g in groups for p in g['params'])
        total = sum(p.numel() for p in model.parameters())
        folder = RunFolder(self.out, options.recorded(precision=self.precision, pretrained=self.choice.pretrained),
                           dict(total=total, trainable=trainable), ranks, sharded=options.fsdp)
        optimizer = self._optimizer(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(options.warmup, options.steps))
        start, positions = folder.resume(model, optimizer, scheduler)
        if start >= options.steps:
            raise UsageError(f"{self.out} has done {start} steps already: give more {param('steps')} to go on")
        if ranks.rank == 0 and not options.quiet:
            sharded = f", sharded across {plural(ranks.world_size, 'process')} (FSDP)" if options.fsdp else ''
            for note in listing.notes():
                print(note, file=sys.stderr)
            print(f"training {options.model} on {self.device}: precision {self.precision}, "
                  f"{plural(trainable, 'parameter')} of {total} trained"
                  f"{f', LoRA rank {options.lora}' if options.lora else ''}"
                  f"{sharded}, "
                  f"{plural(len(units), 'shard')}, steps {start + 1} to {options.steps}", file=sys.stderr)
        loop = _Loop(self, model, optimizer, scheduler, folder, units, preprocess, tokenizer)
        loss, val = loop.run(start, positions, val_units)
        released = self._save_released(model, template) if options.save_released else None
        if ranks.rank != 0:
            return None
        print(f"trained {options.model} to step {options.steps} (loss {loss:.4g}) in {self.out}"
              f"{f'; the weights in the released layout: {released}' if released else ''}", file=sys.stderr)
        return TrainResult(self.out, options.steps, loss, val, released)

    def _check_memory(self) -> None:
        """Refuse, before anything is downloaded or loaded, a run whose memory plan does not fit its device."""
        from eva_open_clip.train.plan import check
        failure = None
        if self.ranks.rank == 0:
            try:
                check(*memory_setup(self.options, self.choice, self.ranks))
            except UsageError as e:
                failure = e
        failure = self.ranks.share(failure)
        if failure is not None:
            raise failure

    def _released_template(self) -> str | None:
        """The released file whose layout `--save-released` writes, checked before any work."""
        if not self.options.save_released:
            return None
        from eva_open_clip.hub import cached_file
        from eva_open_clip.train.released import template_path
        return template_path(self.choice.pretrained, cached_file(self.choice.model, self.choice.pretrained))

    def _save_released(self, model, template: str) -> Path | None:
        """The weights (LoRA merged) written in the released layout by rank 0 (gathered from the shards, one
        tensor at a time, with --fsdp)."""
        from eva_open_clip.train.released import save_released
        if self.options.fsdp:
            from eva_open_clip.train.fsdp import full_state
            state = full_state(model)
        else:
            state = model.state_dict()
        if self.ranks.rank != 0:
            return None
        if self.options.lora is not None:
            from eva_open_clip.train.lora import merged_state
            state = merged_state(state, self.choice.model, self.options.lora, self.options.lora_alpha)
        return save_released(state, template, self.options.save_released)

    def _model(self):
        """(the model to train, LoRA-adapted in place with --lora; preprocess, tokenizer)."""
        from eva_open_clip.runtime.loading import load_model
        options = self.options
        torch.manual_seed(options.seed)
        model, preprocess, tokenizer = load_model(self.choice, str(self.device), self.precision)
        model.train()
        if options.lock_image:
            model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
        if options.lock_text:
            model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        if options.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if options.lora is not None:
            from eva_open_clip.train.lora import add_adapters
            add_adapters(model, options.lora, options.lora_alpha, options.lora_dropout)
        return model, preprocess, tokenizer

    def _groups(self, model) -> list[dict[str, Any]]:
        from eva_open_clip.train.groups import param_groups
        o = self.options
        return param_groups(model, o.lr, o.wd, o.visual_lr, o.text_lr, o.visual_layer_decay, o.text_layer_decay)

    def _optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.options.opt == 'lamb':
            from timm.optim import Lamb
            return Lamb(groups, lr=self.options.lr, betas=BETAS, eps=EPS, weight_decay=self.options.wd)
        return torch.optim.AdamW(groups, lr=self.options.lr, betas=BETAS, eps=EPS, weight_decay=self.options.wd)


class _Loop:
    """The steps of a run, from a checkpoint's step and data position to `--steps`."""

    def __init__(self, job: _Job, model, optimizer, scheduler, folder, units, preprocess, tokenizer):
        import open_clip

        from eva_open_clip.runtime.pixels import Pixels
        self.job, self.model, self.optimizer, self.scheduler, self.folder = job, model, optimizer, scheduler, folder
        self.units, self.tokenizer = units, tokenizer
        self.pixels = Pixels(preprocess)
        self.normalization = self.pixels.normalization(job.device)
        self.input_dtype = open_clip.get_input_dtype(job.precision)
        ranks = job.ranks
        self.loss = open_clip.ClipLoss(local_loss=ranks.world_size > 1, gather_with_grad=True, cache_labels=True,
                                       rank=ranks.rank, world_size=ranks.world_size)
        self.forward = model
        if ranks.world_size > 1 and not job.options.fsdp:
            cuda = job.device.type == 'cuda'
            self.forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[job.device] if cuda else None)

    def _autocast(self):
        from eva_open_clip.runtime.devices import autocast
        return autocast(self.job.device.type, self.job.precision)

    def _reading(self):
        from eva_open_clip.embed.job import Reading
        o = self.job.options
        return Reading(o.image_keys, o.caption_key)

    def run(self, start: int, positions: list, val_units: list) -> tuple[float, dict | None]:
        from eva_open_clip.embed.loader import default_workers
        from eva_open_clip.runtime.progress import Progress
        from eva_open_clip.train.data import Pairs, shared_batches
        from eva_open_clip.train.evaluate import Evaluation
        job, options, ranks, share = self.job, self.job.options, self.job.ranks, self.folder.share
        workers = options.workers if options.workers is not None else \
            default_workers(ranks.local_world_size, job.device.type)
        streams = [Pairs(self.units, self.pixels, self.tokenizer, self._reading(), options.batch_size,
                         workers // len(share.streams), options.seed, s, self.folder.streams, job.device.type)
                   for s in share.streams]
        # a sharded model evaluates on every process (each gathers the blocks); rank 0 logs it
        evaluation = Evaluation(val_units, self.pixels, self.tokenizer, self._reading(), workers) \
            if val_units and (ranks.rank == 0 or options.fsdp) else None
        step, loss, val = start, float('nan'), None
        progress = Progress(options.steps, 'step', lambda: step, options.progress_interval,
                            enabled=ranks.rank == 0 and not options.quiet)
        stream: Iterator = shared_batches(streams, positions, share)
        try:
            while step < options.steps:
                began = time.perf_counter()
                pixels, tokens, positions = next(stream)
                rates = self._rates()  # the rates this step uses
                loss = self._step(pixels, tokens)
                step += 1
                seconds = time.perf_counter() - began
                record = dict(step=step, loss=loss, lr=rates, samples_per_s=len(pixels) * ranks.world_size / seconds)
                if job.device.type == 'cuda':
                    record['peak_gpu_memory'] = torch.cuda.max_memory_allocated(job.device)
                self.folder.log(record)
                progress.update(len(pixels))
                if evaluation is not None and (step % options.val_every == 0 or step == options.steps):
                    val = evaluation.run(self.model, self.job.device, self.input_dtype, self.normalization,
                                         self._autocast)
                    self.folder.log(dict(step=step, val=val))
                if step % options.save_every == 0 or step == options.steps:
                    self.folder.save(step, self.model, self.optimizer, self.scheduler, positions)
        finally:
            stream.close()
            progress.close()
        return loss, val

    def _step(self, pixels: torch.Tensor, tokens: torch.Tensor) -> float:
        device = self.job.device
        images = self.pixels.to_model(pixels.to(device, non_blocking=True), self.input_dtype, self.normalization)
        tokens = tokens.to(device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)  # before the forward: no gradients held beside its activations
        with self._autocast():
            image_features, text_features, logit_scale = self.forward(images, tokens)[:3]
            loss = self.loss(image_features, text_features, logit_scale)
        loss.backward()
        if self.job.options.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g['params']],
                                           self.job.options.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.model.logit_scale.requires_grad:  # kept at most ln 100, as open_clip and EVA-CLIP keep it
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100))
        value = loss.detach().float()
        if self.job.ranks.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(value)
            value /= self.job.ranks.world_size
        if not torch.isfinite(value):
            raise ToolError(f'the loss is {value.item()} at this step: lower {param("lr")} or give '
                            f'{param("grad_clip_norm")} (the run folder resumes from its last checkpoint)')
        return value.item()

    def _rates(self) -> dict[str, float]:
        """Each tower's rate now (its top layer's, where layers decay)."""
        rates: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            rates[group['tower']] = max(rates.get(group['tower'], 0.0), group['lr'])
        return rates
