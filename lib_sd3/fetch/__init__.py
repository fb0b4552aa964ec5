"""Resumable, verified downloads from a Hugging Face endpoint or mirror, and the Hub cache layout.

Why our own and not ``huggingface_hub``: A1111's venv pins ``huggingface_hub`` 0.36 (its
transformers 4.30 caps it below 1.0), which does not resume a dropped download; no version checks
more than the byte count, tries a list of mirrors, or can be told to stop. A T5-XXL file is 9.8 GB,
so each of those matters (what was measured: docs/t5.md). ``requests`` (in every A1111 venv) does
the HTTP, ``filelock`` (likewise: torch depends on it) the cross-process lock.

The rooms, one concern each:

- :mod:`~lib_sd3.fetch.known_files`: the one table of files SD3 needs, with sizes and digests;
- :mod:`~lib_sd3.fetch.endpoints`: endpoints in order, their URL scheme, the Hub token, offline mode;
- :mod:`~lib_sd3.fetch.cache`: the Hugging Face cache and home layout (standard library only: the
  doctor reads it too); :mod:`~lib_sd3.fetch.tokenizers` fills it;
- :mod:`~lib_sd3.fetch.lock`: one writer per destination across processes;
- :mod:`~lib_sd3.fetch.remote`: what an endpoint's answers mean (``HEAD``, redirects, status codes);
- :mod:`~lib_sd3.fetch.progress`: how long the walk waits for each endpoint, and progress reports;
- :mod:`~lib_sd3.fetch.download`: one source on one endpoint, streamed, hashed, verified;
- :mod:`~lib_sd3.fetch.walk`: :func:`fetch` itself, the walk over endpoints and sources.

Every error that ends a fetch is a :class:`FetchError` carrying ``manual``: the exact URLs,
destination and sha256 for a user who has to download the file by hand. Importing this package
needs the standard library only; ``requests`` and ``filelock`` are imported when a fetch runs.
"""

from lib_sd3.fetch.cache import hub_cache_dir, hub_token
from lib_sd3.fetch.download import CHUNK_BYTES
from lib_sd3.fetch.endpoints import (
    DEFAULT_ENDPOINT,
    HubAuth,
    endpoints_in_order,
    hub_auth,
    is_offline,
    manual_instructions,
    parse_endpoints,
    resolve_url,
)
from lib_sd3.fetch.errors import FetchCancelled, FetchError, FetchOffline, LockTimeout, NotEnoughSpace, NotWritable
from lib_sd3.fetch.progress import Progress, ProgressCallback
from lib_sd3.fetch.remote import Remote, probe
from lib_sd3.fetch.tokenizers import fetch_tokenizer
from lib_sd3.fetch.walk import (
    CONNECT_TIMEOUT_S,
    GIVE_UP_S,
    READ_TIMEOUT_S,
    FetchOptions,
    FetchResult,
    fetch,
)

__all__ = [
    "CHUNK_BYTES", "CONNECT_TIMEOUT_S", "DEFAULT_ENDPOINT", "GIVE_UP_S", "READ_TIMEOUT_S", "FetchCancelled",
    "FetchError", "FetchOffline", "FetchOptions", "FetchResult", "HubAuth", "LockTimeout", "NotEnoughSpace",
    "NotWritable", "Progress", "ProgressCallback", "Remote", "endpoints_in_order", "fetch", "fetch_tokenizer",
    "hub_auth", "hub_cache_dir", "hub_token", "is_offline", "manual_instructions", "parse_endpoints", "probe",
    "resolve_url",
]
