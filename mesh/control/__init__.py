"""The per-cluster control plane: identity, destination and policy served to proxies."""
