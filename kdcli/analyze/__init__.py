"""Analysis: per-layer figures, importance, activation sensitivity, PCA, granularity and pruning-sensitivity scans."""
