"""Fine-tuning EVA-CLIP as its authors did (`eva-open-clip train`): `param_groups`, the repository's per-tower rates,
layer decay and weight decay for any optimizer; `train(...)`, the whole run as one call.

`options` (the arguments, checked first), `groups`, `data` (the pairs in an order the seed alone fixes), `lora`
(peft's adapters), `checkpoints` (the run folder), `evaluate` (held-out recall@1 and loss), `released` (the
weights back in the released file's layout) and `run` (the loop, on one process or under torchrun).
"""
from eva_open_clip.train.groups import param_groups
from eva_open_clip.train.run import TrainResult, train

__all__ = ['TrainResult', 'param_groups', 'train']
