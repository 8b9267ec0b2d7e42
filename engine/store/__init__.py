"""What lives under runs/: the content-addressed cache (keys, entries, the remote transport, gc) and
each run's record (run.json, links)."""
