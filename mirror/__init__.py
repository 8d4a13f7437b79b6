"""The service-mirror controller: Link handling, mirror Services of a linked cluster's
exported Services, and the link / unlink / check commands.

`link` is the Link resource's spec; `mirrors` what a mirror Service and its
EndpointSlices look like; `controller` the reconciles of one Link, run behind a
Lease by `run` (``meshgate mirror run``); `credentials`, `remote`, `addresses`
and `probe` the linked cluster's API, its gateway's addresses and liveness;
`status` the Link's conditions; `crds` installs the CustomResourceDefinition.
`gateways` and `check` are the commands that report on Links, reading the
importing cluster through `importing`; `audit` finds orphaned, colliding and
endpoint-less mirrors."""
