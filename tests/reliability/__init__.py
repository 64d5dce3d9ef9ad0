"""Reliability soak: many writer processes, compaction daemons and injected faults."""
