"""A reproducible study of model merging: merges, statistics, data and experts."""
