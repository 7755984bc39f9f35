"""The embedding tool behind `eva-open-clip embed`: inputs to rows, at any scale; `embed(...)` is the whole job
as one call (`api`).

What the inputs hold: `inputs` (listing files, folders, lists, shards and patterns), `tar` (reading a
shard member by member, placing damage), `samples` (members to samples), `decode` (bounded, 8-bit
images and caption text), `skips` (a sample and the reasons one gives no row). How the work is cut and
run: `options` (the arguments, checked first), `devices`, `units` (the job's units of work and their plan
on resume), `loader` (decoding in DataLoader workers), `encoder` (features of a batch), `progress`,
`report` (the final lines), `signals`, `ranks` (this process's place in a torchrun job), and the two jobs,
`folder_job` and `npy_job`. Where the rows go: `store`, which imports nothing of the rest of this package.

The open_clip plugin (`import eva_open_clip`) never imports this package.
"""
from eva_open_clip.embed.api import EmbedResult, embed
from eva_open_clip.embed.store.names import original_name
from eva_open_clip.runtime.signals import Interrupted

__all__ = ['EmbedResult', 'Interrupted', 'embed', 'original_name']
