"""Where the reference state_dict listings (``statedicts/*.tsv``) live: ``$MFM_JAX_STATEDICTS``,
else ``shared/reference/statedicts`` inside or beside the checkout, else the workspace's
``/work/shared/reference/statedicts``. Tests that need them skip
with the path in the message when none exists."""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CANDIDATES = [os.environ.get("MFM_JAX_STATEDICTS", ""),
               os.path.join(_ROOT, "shared", "reference", "statedicts"),
               os.path.join(os.path.dirname(_ROOT), "shared", "reference", "statedicts"),
               "/work/shared/reference/statedicts"]
STATEDICTS = next((c for c in _CANDIDATES if c and os.path.isdir(c)), _CANDIDATES[-1])
