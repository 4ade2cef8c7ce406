"""Whether the Hugging Face Hub can be reached, asked once and without huggingface_hub's retries.

huggingface_hub retries a request that fails on the network five times with back-off (about 30 s) before it gives
up; a hub id on a machine without network should be named in seconds. `unreachable()` sends one request to the
endpoint and remembers the answer for the process; a caller then loads from the local cache only, or says why not.
"""

from __future__ import annotations

from functools import lru_cache

TIMEOUT_S = 10.0


@lru_cache(maxsize=1)
def unreachable() -> str | None:
    """None when the hub answers; else why it cannot be asked (offline mode, or the error of the one request)."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=TIMEOUT_S)
    except Exception as err:  # httpx's connect, DNS and timeout errors alike: no answer is all that matters here
        return f"{constants.ENDPOINT} did not answer one request: {str(err).strip() or type(err).__name__}"
    return None
