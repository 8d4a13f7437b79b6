"""``meshgate check``: what is wrong with a cluster before and after install, in the
shape of ``linkerd check``.

`results` holds what a check says; `pre`, `control` and `dataplane` decide, with no
I/O, over objects read once (`kubeapi` reads them with the kubernetes client);
`render` prints the lines or the JSON; `commands` wires the command."""
