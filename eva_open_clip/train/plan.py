"""The memory plan of a `train` run: what each process holds, computed from the model built on the meta device
(no weights read, nothing downloaded, no memory), and whether it fits the device.

Per process, for P parameters of which T train, on N processes:
- weights: P x the parameters' bytes (/N with FSDP);
- gathered blocks (FSDP): the largest block whole, twice (the one computing and the one prefetched), in the compute
  dtype, and its gradient in fp32 before the reduce-scatter;
- gradients: T x the parameters' bytes (/N with FSDP);
- DDP's buckets: with DDP, a second copy of the gradients, kept for the whole run;
- optimizer: two moments per trained parameter (AdamW and LAMB), in the parameters' dtype (/N with FSDP);
- optimizer step: its temporaries, one trained parameter's worth (torch's foreach implementations);
- autocast's copies: with autocast on unsharded weights, their 16-bit copies, held from the forward to the backward;
- activations: the tensors autograd saves in one training forward of one sample of the model, in the compute dtype,
  counted as they are saved (views of one tensor once), times the batch; with activation checkpointing, each
  block's input, the largest block's own, and what is outside the blocks. Attention is counted as fused kernels
  (flash attention, on GPUs and CPUs) save it: queries, keys, values, output and log-sum-exp, no attention matrix
  (on a torch without the CPU flash kernel's meta function, as the math saves it: an upper bound).

The gradients are freed before each forward pass and grow as the backward pass frees the activations, so the passes
peak at the larger of the two (with everything else that is held); the step holds the weights, gradients, optimizer
state and its temporaries. The plan's peak is the larger of the passes' and the step's. A plan fits when its peak is
at most FITS of the device's memory (the rest: the CUDA context, the allocator's
fragmentation, the data pipeline's buffers). `check` refuses a run that does not fit, naming what would make it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from eva_open_clip.errors import UsageError, param

FITS = 0.9
GB = 1e9
PARTS = ('weights', 'gathered', 'gradients', 'buckets', 'optimizer', 'step', 'autocast', 'activations')
LABELS = dict(weights='weights', gathered='gathered blocks (FSDP)', gradients='gradients', buckets="DDP's buckets",
              optimizer='optimizer state', step="optimizer step's temporaries", autocast="autocast's 16-bit weights",
              activations='activations')
_PARAM_DTYPES = {'bf16': torch.bfloat16, 'pure_bf16': torch.bfloat16, 'fp16': torch.float16,
                 'pure_fp16': torch.float16}
_COMPUTE_DTYPES = dict(_PARAM_DTYPES, amp=torch.float16, amp_bf16=torch.bfloat16, amp_bfloat16=torch.bfloat16)


@dataclass(frozen=True)
class Setup:
    """What a plan is for: the model, the processes, the batch per process and the training settings."""

    model: str
    processes: int = 1
    batch_size: int = 32
    precision: str = 'fp32'
    fsdp: bool = False
    lora: int | None = None
    grad_checkpointing: bool = False
    lock_image: bool = False
    lock_text: bool = False

    def flags(self, precision: bool = False) -> str:
        """The settings as the command line gives them (and the precision)."""
        words = [param('precision', self.precision)] if precision else []
        words += [param('batch_size', self.batch_size)]
        words += [param('fsdp')] if self.fsdp else []
        words += [param('grad_checkpointing')] if self.grad_checkpointing else []
        words += [param('lora', self.lora)] if self.lora else []
        return ' '.join(words)


@dataclass(frozen=True)
class Plan:
    """Each part's bytes per process (`PARTS`), for `setup`, with the parameter counts; `memory` (bytes) and
    `where` say what it is to fit."""

    setup: Setup
    parameters: int
    trained: int
    weights: int
    gathered: int
    gradients: int
    buckets: int
    optimizer: int
    step: int
    autocast: int
    activations: int
    memory: float | None = None
    where: str = ''

    @property
    def passes(self) -> int:
        """The forward and backward passes' peak."""
        held = sum(getattr(self, part) for part in PARTS if part not in ('step', 'gradients', 'activations'))
        return held + max(self.gradients, self.activations)

    @property
    def total(self) -> int:
        """The peak: the passes', or the optimizer step's."""
        return max(self.passes, self.weights + self.gradients + self.buckets + self.optimizer + self.step)

    def fits(self, memory: float | None = None) -> bool:
        memory = self.memory if memory is None else memory
        return memory is None or self.total <= FITS * memory

    def __str__(self) -> str:
        from eva_open_clip.errors import spelled
        return '\n'.join(spelled(line) for line in self.lines())

    def lines(self) -> list[str]:
        """The plan as `--plan` prints it (its parameters marked as `errors.param` marks them)."""
        s, memory = self.setup, self.memory
        lines = [f'memory plan of {s.model} ({self.parameters / 1e9:.3g}B parameters, {self.trained / 1e9:.3g}B '
                 f'trained) on {s.processes} process(es), precision {s.precision}, {s.flags()}; per process, '
                 'computed from the model built on the meta device:']
        lines += [f'  {LABELS[part]:<30} {getattr(self, part) / GB:8.2f} GB' for part in PARTS if getattr(self, part)]
        during = 'the optimizer step' if self.total > self.passes else 'the backward pass'
        lines.append(f'  {"peak":<30} {self.total / GB:8.2f} GB (in {during})')
        if memory is not None:
            verdict = 'fits' if self.fits() else 'does not fit'
            lines.append(f'{verdict} {self.where} ({memory / GB:.3g} GB, of which {FITS:.0%} usable)')
        return lines


def plan(setup: Setup, memory: float | None = None, where: str = '') -> Plan:
    """The plan of `setup` (see the module doc), to fit `memory` bytes `where`."""
    model = _meta_model(setup)
    compute = _COMPUTE_DTYPES.get(setup.precision, torch.float32)
    param_bytes = _PARAM_DTYPES.get(setup.precision, torch.float32).itemsize
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trained = sum(p.numel() for p in params if p.requires_grad)
    shard = setup.processes if setup.fsdp else 1
    from eva_open_clip.sharding import shard_modules
    largest = max(sum(p.numel() for p in block.parameters()) for _, block in shard_modules(model))
    autocast = setup.precision in ('amp', 'amp_bf16', 'amp_bfloat16') and not setup.fsdp
    per_sample = _saved_bytes(model, compute, setup.grad_checkpointing)
    return Plan(setup, total, trained,
                weights=total * param_bytes // shard,
                gathered=largest * (2 * compute.itemsize + 4) if setup.fsdp else 0,
                gradients=trained * param_bytes // shard,
                buckets=trained * param_bytes if setup.processes > 1 and not setup.fsdp else 0,
                optimizer=2 * trained * param_bytes // shard,
                step=trained * param_bytes // shard,
                autocast=sum(p.numel() for p in params if p.ndim >= 2) * 2 if autocast else 0,
                activations=per_sample * setup.batch_size, memory=memory, where=where)


def _meta_model(setup: Setup) -> nn.Module:
    from eva_open_clip.empty_build import meta_model
    model = meta_model(setup.model).train()
    if setup.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if setup.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    if setup.lora:
        from eva_open_clip.train.lora import add_adapters
        with torch.device('meta'):
            add_adapters(model, setup.lora, None, 0.0)
    return model


def _saved_bytes(model: nn.Module, dtype: torch.dtype, checkpointing: bool) -> int:
    """The bytes autograd saves in one training forward of one sample (see the module doc)."""
    from eva_open_clip.sharding import shard_modules
    model = model.to(dtype)
    own = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in own and id(tensor) not in own:
            saved.setdefault(id(base), base)
        return tensor

    def counted() -> int:
        return sum(t.numel() * t.element_size() for t in saved.values())

    spans: list[tuple[int, int]] = []  # (the block's input, what the block saved)

    def enter(module, args):
        module._plan_start = (counted(), args[0].numel() * args[0].element_size())

    def leave(module, args, output):
        before, given = module.__dict__.pop('_plan_start')
        spans.append((given, counted() - before))

    blocks = [block for _, block in shard_modules(model)]
    handles = [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    try:  # counted without checkpointing; what checkpointing keeps is worked out from the counts below
        size = model.visual.trunk.patch_embed.img_size
        images = torch.empty(1, 3, *size, device='meta', dtype=dtype)
        tokens = torch.zeros(1, _context_length(model), dtype=torch.long, device='meta')
        fused = _FusedAttention() if hasattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu') \
            else contextlib.nullcontext()  # an older torch: the attention matrices the math saves, an upper bound
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused:
            model(images, tokens)
    finally:
        for h in handles:
            h.remove()
    everything = counted()
    if not checkpointing or not spans:
        return everything
    inside = sum(s for _, s in spans)
    return everything - inside + sum(g for g, _ in spans) + max(s for _, s in spans)


class _FusedAttention(TorchFunctionMode):
    """Attention as the flash kernel runs it (what it saves for the backward pass), where the meta device would run
    the math that saves the attention matrix: `scaled_dot_product_attention`, and the self-attention of
    `nn.MultiheadAttention` (open_clip's text towers) built on it."""

    SDPA = ('query', 'key', 'value', 'attn_mask', 'dropout_p', 'is_causal', 'scale')
    MHA = ('query', 'key', 'value', 'embed_dim_to_check', 'num_heads', 'in_proj_weight', 'in_proj_bias', 'bias_k',
           'bias_v', 'add_zero_attn', 'dropout_p', 'out_proj_weight', 'out_proj_bias', 'training')

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            given = dict(zip(self.SDPA, args), **kwargs)
            return _flash(given['query'], given['key'], given['value'], given.get('attn_mask'),
                          given.get('dropout_p', 0.0), given.get('is_causal', False), given.get('scale'))
        if func is F.multi_head_attention_forward:
            given = dict(zip(self.MHA, args), **kwargs)
            if given['in_proj_weight'] is not None and given['bias_k'] is None and not given['add_zero_attn'] \
                    and given.get('key_padding_mask') is None and not given.get('need_weights', True):
                return _self_attention(given), None
        return func(*args, **kwargs)


def _flash(q, k, v, mask, dropout: float, causal: bool, scale) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, causal, attn_mask=mask,
                                                                      scale=scale)[0]


def _self_attention(given: dict) -> torch.Tensor:
    """`F.multi_head_attention_forward`'s self-attention (sequence first), on `_flash`."""
    x, heads = given['query'], given['num_heads']
    length, batch, width = x.shape
    q, k, v = (t.reshape(length, batch * heads, width // heads).transpose(0, 1).reshape(batch, heads, length, -1)
               for t in F.linear(x, given['in_proj_weight'], given['in_proj_bias']).chunk(3, dim=-1))
    out = _flash(q, k, v, given.get('attn_mask'), given['dropout_p'] if given.get('training', True) else 0.0,
                 given.get('is_causal', False), None)
    out = out.permute(2, 0, 1, 3).reshape(length * batch, width)
    return F.linear(out, given['out_proj_weight'], given['out_proj_bias']).view(length, batch, width)


def _context_length(model: nn.Module) -> int:
    text = getattr(model, 'text', None)
    owner = text if isinstance(text, nn.Module) else model
    return int(getattr(owner, 'context_length', None) or owner.positional_embedding.shape[0])


def device_memory(device: torch.device, local_processes: int = 1) -> tuple[float, str]:
    """The memory one process of a run on `device` may use, and where it is: a GPU's total memory, or on the CPU
    the memory available now shared by this machine's processes."""
    if device.type == 'cuda':
        properties = torch.cuda.get_device_properties(device)
        return float(properties.total_memory), f'on {properties.name}'
    share = f' (1/{local_processes} each)' if local_processes > 1 else ''
    return _available_memory() / local_processes, f'in the memory available on this machine{share}'


def _available_memory() -> float:
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))


def check(setup: Setup, memory: float, where: str) -> Plan:
    """The plan of `setup`, or a one-line refusal naming what would make it fit `memory`."""
    found = plan(setup, memory, where)
    if found.fits():
        return found
    fix = _what_fits(setup, memory)
    hint = f'give {fix.flags(fix.precision != setup.precision)} ({plan(fix).total / GB:.3g} GB)' if fix else \
        'it needs more processes with --fsdp, or GPUs with more memory'
    raise UsageError(f'{setup.model} does not fit {where}: its plan needs {found.total / GB:.3g} GB per process of '
                     f'the {FITS * memory / GB:.3g} GB usable; {hint}; {param("plan")} shows each part')


def _what_fits(setup: Setup, memory: float) -> Setup | None:
    """The nearest settings that fit: checkpointing, then FSDP (on several processes), then LoRA (with peft), then
    the weights in bf16, then a smaller batch, each added to the last."""
    tries = [setup]
    if not setup.grad_checkpointing:
        tries.append(replace(tries[-1], grad_checkpointing=True))
    if setup.processes > 1 and not setup.fsdp:
        tries.append(replace(tries[-1], fsdp=True))
    if not setup.lora and importlib.util.find_spec('peft') is not None:  # LoRA where the lora extra is installed
        tries.append(replace(tries[-1], lora=8))
    if _PARAM_DTYPES.get(setup.precision, torch.float32).itemsize > 2:
        tries.append(replace(tries[-1], precision='pure_bf16'))
    for candidate in tries[1:]:
        if plan(candidate).fits(memory):
            return candidate
    batch = tries[-1].batch_size // 2
    while batch >= 1:
        candidate = replace(tries[-1], batch_size=batch)
        if plan(candidate).fits(memory):
            return candidate
        batch //= 2
    return None
