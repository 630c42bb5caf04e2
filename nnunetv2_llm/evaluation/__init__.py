"""Is it better? Metrics, paired statistics, compare, head-to-head and the layer sweep."""
