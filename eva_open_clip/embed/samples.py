"""The samples of one unit of work: a shard's consecutive members of one key (webdataset's rule), or image
files. A sample that cannot be used is a `Skip` with its key and reason, never an exception."""
from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

from eva_open_clip.embed.remote import RemoteOptions
from eva_open_clip.embed.store import metadata
from eva_open_clip.embed.tar import MAX_MEMBER_BYTES, TOO_LARGE, ShardRead, tar_members
from eva_open_clip.runtime.defaults import IMAGE_KEYS
from eva_open_clip.runtime.skips import Reason, Sample, Skip


def _tar_samples(shard: str, image_keys: Sequence[str], caption_key: str | None, remote: RemoteOptions,
                 read: ShardRead | None) -> Iterator[Sample | Skip]:
    """The samples of a shard: consecutive members with one key (webdataset's rule), in order."""
    members: dict[str, Any] = {}
    for item in tar_members(shard, remote, read):
        if isinstance(item, Skip):
            if item.key is not None and members.get('__key__') == item.key:
                members = {}  # the sample the damage cut into
            break
        key, extension, data = item
        if members and members['__key__'] != key:
            yield _sample(members, image_keys, caption_key)
            members = {}
        members.setdefault('__key__', key)
        members.setdefault(extension, data)
    else:
        item = None
    if members:
        yield _sample(members, image_keys, caption_key)
    if item is not None:
        yield item


def _sample(raw: dict[str, Any], image_keys: Sequence[str], caption_key: str | None) -> Sample | Skip:
    key = raw['__key__']
    image = next((raw[k] for k in image_keys if k in raw), None)
    if image is None:
        return Skip(key, Reason.NO_IMAGE, 'no ' + '/'.join(image_keys) + ' member')
    too_large = next((ext for ext, data in raw.items() if data is TOO_LARGE), None)
    if too_large is not None:
        return Skip(key, Reason.MEMBER_TOO_LARGE, f'its {too_large} member is over {MAX_MEMBER_BYTES >> 20} MB')
    meta = None
    if 'json' in raw:
        try:
            meta = json.loads(raw['json'])
            if not isinstance(meta, dict):
                return Skip(key, Reason.BAD_JSON, 'not a JSON object')
            meta = metadata.sample_fields(meta)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep for the parser
            return Skip(key, Reason.BAD_JSON, str(e)[:80] or type(e).__name__)
    return Sample(key, image, raw.get(caption_key) if caption_key else None, meta)


def unit_samples(shard: str | None, files: Sequence[str], image_keys: Sequence[str] = IMAGE_KEYS,
                 caption_key: str | None = None, remote: RemoteOptions = RemoteOptions(),
                 read: ShardRead | None = None) -> Iterator[Sample | Skip]:
    """The samples of a shard, or of image files (which have no captions), in order (`read`: see `tar_members`)."""
    if shard is None:
        yield from (Sample(path, path) for path in files)
    else:
        yield from _tar_samples(shard, image_keys, caption_key, remote, read)
