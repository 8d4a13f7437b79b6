"""The embedded default cluster: a Kubernetes-compatible API server persisted in SQLite,
served over HTTPS with its own CA, with the controllers meshgate relies on
(endpoints, namespaces, service-account tokens)."""
