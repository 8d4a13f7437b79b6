"""The embedded cluster's kubelet: binds unscheduled Pods to the one node, runs
the containers of Pods bound to it as processes in the Pod's network namespace
and a private mount namespace, reports their status and Events as kube's kubelet
does, serves their logs, and finishes graceful deletes.

It pulls no images: a container with a ``command`` runs it from this machine's
filesystem, meshgate's own image (`images.MESHGATE_IMAGE`) runs the local
installation, and any other container waits with a reason that says so.
"""
