"""The embedding tool behind `eva-open-clip embed`: inputs to rows, at any scale.

What the inputs hold: `inputs` (listing files, folders, lists, shards and patterns), `tar` (reading a
shard member by member, placing damage), `samples` (members to samples), `decode` (bounded, 8-bit
images and caption text), `skips` (a sample and the reasons one gives no row). How the work is cut and
run: `units` (the job's units of work and their plan on resume), `loader` (decoding in DataLoader
workers), `encoder` (features of a batch), `progress`, `ranks` (this process's place in a torchrun job)
and `job` (the folder job across ranks). Where the rows go: `store` (the output folder and the `.npy` file).

The open_clip plugin (`import eva_open_clip`) never imports this package.
"""
from eva_open_clip.embed.store.names import original_name

__all__ = ['original_name']
