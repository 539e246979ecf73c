"""``strategy="write_behind"``: flushes queued in Redis streams, applied later by a worker.

* :mod:`.session`: a flush emits no SQL for write-behind rows; the commit queues them
  (all or none) and identity reads see the queued state at once;
* :mod:`.states`: serving and refilling queued states, Python-side defaults;
* :mod:`.checks`: what ``attach()`` refuses (server-side defaults, AOF off...);
* :mod:`.columns`, :mod:`.ids`: the model's columns, primary keys from sequence blocks;
* :mod:`.worker`: the flush worker, dead-letter replay, the ``worker`` command.
"""

from __future__ import annotations
