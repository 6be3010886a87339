"""Stage 3: the analysis of a sweep (reading run folders, grouping, statistics, tables, plots)."""
