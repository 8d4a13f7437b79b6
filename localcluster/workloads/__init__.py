"""apps/v1 and batch/v1 workloads and the Node: kube's defaults and validation for
them, the Scale subresource, and the in-process controllers that
kube-controller-manager would run (deployments, replica sets, daemon sets, jobs,
garbage collection)."""
