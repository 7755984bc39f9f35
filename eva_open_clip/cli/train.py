"""`eva-open-clip train`: fine-tune an EVA-CLIP model as its authors did (`eva_open_clip.train`); its flags are those of
`train.options.TrainOptions`."""
from __future__ import annotations

import argparse

from eva_open_clip.cli.options import add_model_options

HELP = "fine-tune a model on image-caption shards: EVA-CLIP's per-tower rates and layer decay, LoRA, exact resume"
DESCRIPTION = ('Fine-tune a registered model (--model, --pretrained file or tag) on image-caption webdataset shards '
               'for --steps optimizer steps, with EVA-CLIP\'s recipe: a learning rate and a layer-wise decay per '
               'tower, weight decay but on 1-D tensors, biases and position embeddings, warm-up then cosine; or '
               'LoRA adapters (--lora R). The run folder --out RUN holds log.jsonl and checkpoint.pt; the same '
               'command resumes a run that stopped, to the weights of an uninterrupted one, on as many processes or '
               'on another number. Under torchrun each process takes its share of the shards (DDP, or --fsdp to '
               'shard the model block by block). --save-released FILE writes the weights in the released file\'s '
               'layout at the end. --plan prints the memory each process needs and whether it fits, before any '
               'download; a run that would not fit is refused, naming what would make it fit.')
PRECISION_HELP = ('bf16 autocast on a GPU with bf16 tensor cores (amp_bf16, fp32 weights), fp16 autocast (amp) on '
                  'older GPUs, fp32 on the CPU (the defaults); pure_bf16 keeps the weights in bf16')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eva_open_clip.train.options import TRAIN_PRECISIONS
    from eva_open_clip.train.options import add_arguments as add_train_options
    add_train_options(parser)
    add_model_options(parser, PRECISION_HELP, precisions=TRAIN_PRECISIONS, inference=False)


def run(args: argparse.Namespace) -> int:
    from eva_open_clip.errors import COMMAND_LINE, spelled
    from eva_open_clip.train.options import TrainOptions
    from eva_open_clip.train.plan import Plan
    from eva_open_clip.train.run import run_train
    result = run_train(TrainOptions.from_args(args))
    if isinstance(result, Plan):
        print('\n'.join(spelled(line, COMMAND_LINE) for line in result.lines()))
    return 0
