"""Seeds derived from the config's master seed, so every rule has its own stable stream."""

from __future__ import annotations

import hashlib


def derive(master: int, *names: object) -> int:
    """A 31-bit seed from the master seed and any number of names (rule, method, case...).

    Stable across Python versions and processes (no use of ``hash()``, which is salted).
    """
    text = "/".join([str(int(master))] + [str(n) for n in names])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF
