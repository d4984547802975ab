"""What operators see: HTTP endpoints, health and readiness, metrics in every dialect, logs.
Never on the packet path."""
