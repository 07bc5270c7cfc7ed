"""What every stage shares: the run folder's layout, provenance tags, entry-script helpers."""
