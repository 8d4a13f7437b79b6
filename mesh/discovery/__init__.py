"""Service discovery through the control plane.

`index` builds the proxy's `ServiceSpec`s from a cluster's Services,
EndpointSlices and Pods; `server` streams them to watchers over mTLS
(``GET /v1/destinations``); `client` is the proxy's side of that stream, a
`Discovery` that keeps serving its last known data while the control plane is
away.

This package's ``__init__`` imports nothing: the proxy imports `client`, and
must not pull in the server side (and with it the kubernetes client).
"""
