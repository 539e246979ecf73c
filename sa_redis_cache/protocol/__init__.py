"""Everything the library and its worker say to Redis: keys, the channel, the scripts.

* :mod:`.keys`: :class:`KeyScheme` builds every key and the invalidation channel;
* :mod:`.scripts`: the Lua scripts, and one function per script that builds its KEYS and
  ARGV (the session side, the worker and ``dlq replay`` call the same ones);
* :mod:`.streams`: the write-behind streams' consumer group, partitions and ids.

Nothing outside this package spells a key, a suffix or a script's argument list.
"""

from __future__ import annotations

from .keys import KeyScheme, escape_glob, is_queue_key, pk_text
from .scripts import Script, ScriptCall
from .streams import HEADER, partition_of, stream_id

__all__ = [
    "HEADER",
    "KeyScheme",
    "Script",
    "ScriptCall",
    "escape_glob",
    "is_queue_key",
    "partition_of",
    "pk_text",
    "stream_id",
]
