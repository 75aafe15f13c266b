"""Statistics records, ``inspect`` reports and plots."""
