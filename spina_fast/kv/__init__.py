"""The replicated key/value store (Consul KV semantics) and, on top of it, hierarchical configuration."""
