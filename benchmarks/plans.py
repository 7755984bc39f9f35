"""The memory plans of docs/train.md ("Plans for the giants"): for EVA-CLIP-8B and 18B, full fine-tuning and LoRA, on
1, 8 and 64 GPUs of 24, 40 and 80 GB, the largest batch per GPU whose plan fits (`eva_open_clip.train.plan`,
computed from the models built on the meta device: nothing is downloaded), as markdown tables.

    python benchmarks/plans.py        # about a minute
"""
from __future__ import annotations

import dataclasses

import eva_open_clip  # noqa: F401  (registers the models)
from eva_open_clip.train.plan import FITS, GB, Setup, plan

MODELS = ('EVA-CLIP-8B', 'EVA-CLIP-18B')
GPUS = (1, 8, 64)
MEMORY_GB = (24, 40, 80)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MODES = {'full fine-tuning (amp_bf16: fp32 weights, bf16 compute)': dict(precision='amp_bf16'),
         'LoRA rank 8 (pure_bf16 weights)': dict(precision='pure_bf16', lora=8)}


def cell(setup: Setup, memory_gb: int) -> str:
    """The largest batch per GPU that fits, with its peak; or what batch 1 needs."""
    one = plan(dataclasses.replace(setup, batch_size=1))
    best = None
    for batch in BATCHES:
        candidate = dataclasses.replace(one, setup=dataclasses.replace(setup, batch_size=batch),
                                        activations=one.activations * batch)
        if candidate.total <= FITS * memory_gb * GB:
            best = candidate
    if best is None:
        return f'no (batch 1: {one.total / GB:.0f} GB)'
    return f'{best.setup.batch_size} ({best.total / GB:.0f} GB)'


def main() -> None:
    for model in MODELS:
        for mode, settings in MODES.items():
            print(f'\n{model}, {mode}, --grad-checkpointing, --fsdp on more than one GPU: the largest batch per GPU '
                  f'(of {", ".join(map(str, BATCHES[:3]))}, ... {BATCHES[-1]}) whose plan fits, and its peak\n')
            print('| GPUs | ' + ' | '.join(f'{m} GB' for m in MEMORY_GB) + ' |')
            print('| --- |' + ' --- |' * len(MEMORY_GB))
            for gpus in GPUS:
                setup = Setup(model, gpus, 1, fsdp=gpus > 1, grad_checkpointing=True, **settings)
                print(f'| {gpus} | ' + ' | '.join(cell(setup, m) for m in MEMORY_GB) + ' |', flush=True)


if __name__ == '__main__':
    main()
