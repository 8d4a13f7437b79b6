"""Trust-anchor rotation without downtime, one checked step at a time.

The procedure, each step refused until the previous one has had time to
reach every workload (one full leaf lifetime, after which every certificate
issued before the step has been renewed):

1. ``add-anchor``: a new anchor joins the trust bundle. Workloads learn it when
   they next renew (the service sends the bundle with every certificate).
2. ``reissue-issuer``: the issuer is re-signed by the new anchor. Leaves
   renewed from now on chain to it; peers already trust it (step 1).
3. ``remove-anchor``: the old anchor leaves the bundle once no leaf under it
   can still be in use.

The phase and the time of the last step live in ``rotation.json`` in the
issuer directory, so the procedure survives restarts and can be resumed by
another operator.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mesh.identity import ca
from mesh.identity.bundle import TrustBundle, issued_by
from mesh.identity.ca import IssuerDir
from mesh.identity.errors import TrustSetupError

STATE_FILE = "rotation.json"


class Phase(enum.StrEnum):
    STEADY = "steady"
    ANCHOR_ADDED = "anchor-added"
    ISSUER_REISSUED = "issuer-reissued"


class NotYet(TrustSetupError):
    """A step asked for before the previous one can have reached every workload."""


@dataclass(frozen=True)
class RotationState:
    phase: Phase
    at: dt.datetime | None = None
    old_anchor: str = ""
    new_anchor: str = ""

    def to_json(self) -> str:
        return json.dumps({"phase": self.phase.value,
                           "at": self.at.isoformat() if self.at else None,
                           "oldAnchor": self.old_anchor, "newAnchor": self.new_anchor},
                          indent=2)


class Rotation:
    def __init__(self, directory: Path, *, leaf_lifetime: dt.timedelta) -> None:
        self.issuers = IssuerDir(directory)
        self.path = directory / STATE_FILE
        self.leaf_lifetime = leaf_lifetime

    def state(self) -> RotationState:
        if not self.path.exists():
            return RotationState(Phase.STEADY)
        try:
            doc = json.loads(self.path.read_text())
            at = dt.datetime.fromisoformat(doc["at"]) if doc.get("at") else None
            return RotationState(Phase(doc["phase"]), at, doc.get("oldAnchor", ""),
                                 doc.get("newAnchor", ""))
        except (ValueError, KeyError, TypeError) as e:
            raise TrustSetupError(f"{self.path} is damaged ({e}); restore it or remove it "
                                  "to start the rotation over") from e

    def _save(self, state: RotationState) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        os.replace(tmp, self.path)

    def ready_at(self, state: RotationState) -> dt.datetime | None:
        """When the next step becomes safe (None in the steady phase)."""
        return state.at + self.leaf_lifetime if state.at else None

    def _require(self, phase: Phase, now: dt.datetime, force: bool) -> RotationState:
        state = self.state()
        if state.phase is not phase:
            raise TrustSetupError(f"this step needs the rotation to be in phase {phase.value}, "
                                  f"but it is in {state.phase.value}; run `meshgate identity "
                                  "rotate status` for the next step")
        ready = self.ready_at(state)
        if ready and now < ready and not force:
            raise NotYet(f"not yet safe: certificates issued before {state.at:%Y-%m-%dT%H:%M:%SZ}"
                         f" may still be in use until {ready:%Y-%m-%dT%H:%M:%SZ} "
                         f"({(ready - now).total_seconds():.0f}s from now); wait (or --wait)")
        return state

    def add_anchor(self, *, now: dt.datetime, anchor_lifetime: dt.timedelta,
                   trust_domain: str) -> TrustBundle:
        self._require(Phase.STEADY, now, force=True)
        bundle = self.issuers.load_bundle()
        issuer = self.issuers.load_issuer()
        if len(bundle.anchors) != 1:
            raise TrustSetupError(f"the trust bundle holds {len(bundle.anchors)} anchors; a "
                                  "rotation starts from exactly one")
        old = bundle.anchors[0]
        if not issued_by(issuer.cert, old):
            raise TrustSetupError("the issuer is not signed by the bundle's anchor; repair the "
                                  "issuer directory before rotating")
        new = ca.new_anchor(trust_domain, lifetime=anchor_lifetime, now=now)
        self.issuers.save_pending_anchor(new)
        bundle = bundle.with_anchor(new.cert)
        self.issuers.save_bundle(bundle)
        self._save(RotationState(Phase.ANCHOR_ADDED, now, TrustBundle.fingerprint(old),
                                 TrustBundle.fingerprint(new.cert)))
        return bundle

    def reissue_issuer(self, *, now: dt.datetime, issuer_lifetime: dt.timedelta,
                       trust_domain: str, force: bool = False) -> ca.CertKey:
        state = self._require(Phase.ANCHOR_ADDED, now, force)
        new_anchor = self.issuers.load_pending_anchor()
        if TrustBundle.fingerprint(new_anchor.cert) != state.new_anchor:
            raise TrustSetupError("the pending anchor does not match the one this rotation "
                                  "added; restore anchor-next.crt/key")
        issuer = ca.new_issuer(new_anchor, trust_domain, lifetime=issuer_lifetime, now=now)
        self.issuers.promote_pending_anchor()
        self.issuers.save_issuer(issuer)
        self._save(RotationState(Phase.ISSUER_REISSUED, now, state.old_anchor,
                                 state.new_anchor))
        return issuer

    def remove_anchor(self, *, now: dt.datetime, force: bool = False) -> TrustBundle:
        state = self._require(Phase.ISSUER_REISSUED, now, force)
        bundle = self.issuers.load_bundle()
        remaining = bundle.without_anchor(state.old_anchor)
        issuer = self.issuers.load_issuer()
        if remaining.signer_of(issuer.cert) is None:
            raise TrustSetupError("the issuer does not chain to the anchors that would remain")
        self.issuers.save_bundle(remaining)
        self._save(RotationState(Phase.STEADY, None))
        return remaining

    def describe(self, now: dt.datetime) -> str:
        """Where the rotation stands and what to run next, in words."""
        state = self.state()
        bundle = self.issuers.load_bundle()
        lines = ["anchors trusted: " + ", ".join(bundle.describe(a) for a in bundle.anchors)]
        issuer = self.issuers.load_issuer().cert
        signer = bundle.signer_of(issuer)
        lines.append(f"issuer: {issuer.subject.rfc4514_string()}, signed by "
                     f"{bundle.describe(signer) if signer else 'an anchor not in the bundle'}, "
                     f"valid until {issuer.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
        nxt = {Phase.STEADY: "add-anchor", Phase.ANCHOR_ADDED: "reissue-issuer",
               Phase.ISSUER_REISSUED: "remove-anchor"}[state.phase]
        ready = self.ready_at(state)
        when = "now" if not ready or now >= ready else f"after {ready:%Y-%m-%dT%H:%M:%SZ}"
        lines.append(f"phase: {state.phase.value}; next step: {nxt} ({when})")
        return "\n".join(lines)

