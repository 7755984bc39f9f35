"""Pretrained tags' files on the Hugging Face hub: where each is, whether it is cached, and fetching it.

open_clip downloads a tag's file through `huggingface_hub`, whose retries leave a machine without
network waiting about 25 s for a failure. `ensure_downloaded` asks the hub once, without retries, and
fails within seconds saying what to do.
"""
from __future__ import annotations

from pathlib import Path

from open_clip.pretrained import download_pretrained, get_pretrained_cfg

from .errors import ToolError, param


def hub_location(model_name: str, tag: str) -> tuple[str, str] | None:
    """(repo id, file name) of a tag's file on the hub, as open_clip splits it, if the tag has one."""
    hub = (get_pretrained_cfg(model_name, tag) or {}).get('hf_hub', '')
    if not hub:
        return None
    repo, _, filename = hub.rstrip('/').rpartition('/')
    return repo, filename


def cached_file(model_name: str, tag: str, cache_dir: str | None = None) -> Path | None:
    """The tag's file in the local hub cache (where open_clip's download puts it; `cache_dir` if given), if it is
    there."""
    from huggingface_hub import try_to_load_from_cache
    location = hub_location(model_name, tag)
    if location is None:
        return None
    found = try_to_load_from_cache(*location, cache_dir=cache_dir)
    return Path(found) if isinstance(found, str) else None


def ensure_downloaded(model_name: str, tag: str, cache_dir: str | None = None) -> None:
    """Download the tag's file into the hub cache unless it is there; an unreachable hub fails at once."""
    location = hub_location(model_name, tag)
    if location is None or cached_file(model_name, tag, cache_dir) is not None:
        return
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import OfflineModeIsEnabled
    repo, filename = location
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename), timeout=10)  # one request, no retries
    except Exception as e:  # offline mode, no route, DNS, timeout, an HTTP error: all stop here
        reason = 'HF_HUB_OFFLINE is set' if isinstance(e, OfflineModeIsEnabled) else \
            (str(e).splitlines() or [type(e).__name__])[0][:160]
        answered = getattr(getattr(e, 'response', None), 'status_code', None)
        problem = f'the Hugging Face hub answered {answered}' if answered else 'the Hugging Face hub cannot be reached'
        raise ToolError(
            f"{param('pretrained', tag)}: {repo}/{filename} is not cached and {problem} ({reason}). Download "
            f"{filename} where there is network and pass {param('pretrained', f'/path/to/{filename}')}; on machines "
            f'without network set HF_HUB_OFFLINE=1 so that nothing waits for the hub') from None
    download_pretrained(get_pretrained_cfg(model_name, tag), cache_dir=cache_dir)  # with huggingface_hub's bar
