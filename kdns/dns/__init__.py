"""DNS facts: wire constants, names, RR value types. Knows nothing of Kubernetes, sockets or
the zone image."""
