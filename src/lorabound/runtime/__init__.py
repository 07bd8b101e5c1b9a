"""The runtime layer: files, folders, threads and processes, free of torch at import.

- :mod:`.files`: atomic writes, the cache, output folders and their locks, content hashes;
- :mod:`.folders`: resumable run and study folders, claimed by one process (or rank) at a time;
- :mod:`.threads`: torch threads, free cores, offline hub settings, library warnings;
- :mod:`.distributed`: torch.distributed helpers (ranks, barriers, one refusal for all ranks);
- :mod:`.executors`: where a list of jobs runs (this process, or Ray tasks) and which (``--shard I/N``).

Import the module you need (``from lorabound.runtime.files import ...``); this package imports none of them.
"""

__all__ = ["files", "folders", "threads", "distributed", "executors"]
