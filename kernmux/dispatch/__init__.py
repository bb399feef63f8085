"""Platform fingerprint, op and kernel registry, resolver, transforms, hot path, explain."""
