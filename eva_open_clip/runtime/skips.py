"""A sample, and a sample that gives no row: a `Skip` with its key and one of the reason codes of `Reason`."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Reason(str, Enum):
    """Why a sample gives no row (the codes of the skip records; written as their text)."""

    NO_IMAGE = 'no_image'
    BAD_JSON = 'bad_json'
    NO_CAPTION = 'no_caption'
    CAPTION_NOT_TEXT = 'caption_not_text'
    UNDECODABLE_IMAGE = 'undecodable_image'
    IMAGE_TOO_LARGE = 'image_too_large'
    UNSUPPORTED_PIXELS = 'unsupported_pixels'
    MEMBER_TOO_LARGE = 'member_too_large'
    DAMAGED_TAR = 'damaged_tar'
    BAD_SAMPLE = 'bad_sample'
    UNREADABLE_SHARD = 'unreadable_shard'  # the shard itself could not be read: its unit is not done

    __str__ = str.__str__
    __format__ = str.__format__


UNREADABLE = Reason.UNREADABLE_SHARD


@dataclass
class Sample:
    key: str  # the file's path, or the webdataset __key__
    image: Any  # a path or the image file's bytes
    caption: Any = None  # bytes or str, when captions are read
    meta: dict | None = None


@dataclass(frozen=True)
class Skip:
    """A sample that gives no row: its key (None when unknown), a reason code and a detail for people.

    Codes: `no_image`, `bad_json`, `no_caption`, `caption_not_text`, `undecodable_image`, `image_too_large`
    (see `PixelLimits`), `unsupported_pixels`, `member_too_large`, `damaged_tar`, and UNREADABLE
    (`unreadable_shard`: the shard itself could not be read; its unit is not marked done).
    """

    key: str | None
    reason: Reason
    detail: str = ''
