"""The model hub, asked once and quickly before any hub id is used.

Why: without a network, `huggingface_hub` retries each request with back-off (about twenty warning lines and 24 s
for a `diff`, 50 s for a `vocab`) before failing with an exception of its own. One request with a short timeout
says the same thing in a second or two, and the error can say how to work offline.
"""

from __future__ import annotations

import functools
import os
import re

from ..errors import VocabdriftError

HUB_TIMEOUT = 3.0  # seconds for the one reachability request

# What the hub accepts as a repository id (its own validator's rules, without importing it): name characters,
# no "--" or "..", no part starting or ending with "-" or ".", at most 96 characters.
_PART = r"[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?"


def valid_hub_id(text: str) -> bool:
    """`org/name` as the hub spells repository ids (`org/..` and `a--b/c` are not)."""
    return (len(text) <= 96 and re.fullmatch(rf"{_PART}/{_PART}", text) is not None
            and ".." not in text and "--" not in text)


def offline() -> bool:
    """HF_HUB_OFFLINE set: the hub client answers from its local cache only, and nothing is asked."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def require_hub(hub_id: str) -> None:
    """Raise one clear error when `hub_id` must come from a hub that does not answer; nothing when offline mode
    is on (the cache answers) or the hub answers at all (any HTTP status: the hub itself then says what it has)."""
    if offline():
        return
    url = endpoint()
    why = _unreachable(url)
    if why is not None:
        raise VocabdriftError(f"{hub_id}: not a local path, and the hub at {url} is unreachable ({why}); to work "
                              "offline set HF_HUB_OFFLINE=1 (models already in the Hugging Face cache), or pass a "
                              "local model folder")


@functools.cache
def _unreachable(url: str) -> str | None:
    """Why `url` does not answer (None when it does); asked once per process and endpoint, through the standard
    library (which honours the *_PROXY variables as the hub client does)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT):
            return None
    except urllib.error.HTTPError:  # an answer, whatever its status
        return None
    except TimeoutError:
        return f"no answer within {HUB_TIMEOUT:g} s"
    except urllib.error.URLError as e:
        return _short(e.reason if isinstance(e.reason, BaseException) else e)
    except (OSError, ValueError) as e:
        return _short(e)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:120]
