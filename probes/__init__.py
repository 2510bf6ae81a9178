"""headlab.probes: read-only measurement of attention (records, head scores, reports, views)."""
