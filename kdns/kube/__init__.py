"""Kubernetes in: the API and file sources, kubeconfig, the slim cluster model, and the
record rules that turn the model into RRsets. Never builds the zone image."""
