"""Names outside the cluster zones: upstream configuration, the forwarder, its cache and
ExternalName chasing. Knows no Kubernetes."""
