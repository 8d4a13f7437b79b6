"""The names the checks look for: those `meshgate install` gives its objects, and
the injector's, which every part of meshgate uses."""

from __future__ import annotations

from mesh.identity.names import DEFAULT_CONTROL_NS
from mesh.identity.trustroots import TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY
from mesh.install import ISSUER_SECRET

NS = DEFAULT_CONTROL_NS
INJECTOR_WEBHOOK = "meshgate-proxy-injector"
INJECTOR_SERVICE = "meshgate-injector"
CONTROL_DEPLOYMENT = "meshgate-control"
INSTALL_FIX = ("meshgate install --crds | kubectl apply -f -, then meshgate install "
               "--identity-dir DIR | kubectl apply -f -")

__all__ = ["CONTROL_DEPLOYMENT", "INJECTOR_SERVICE", "INJECTOR_WEBHOOK", "INSTALL_FIX",
           "ISSUER_SECRET", "NS", "TRUST_ROOTS_CONFIGMAP", "TRUST_ROOTS_KEY"]
