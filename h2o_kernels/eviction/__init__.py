"""KV-cache eviction: the H2O heavy-hitter policy."""
