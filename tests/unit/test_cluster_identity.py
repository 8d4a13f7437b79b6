"""`cluster up --identity-dir`: each cluster gets its own issuer under a shared trust
anchor (so linked clusters trust each other), and never a copy of the anchor's key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from localcluster.up import UpRequest, _prepare_identity
from mesh.identity.bundle import issued_by
from mesh.identity.ca import IssuerDir


def test_clusters_under_one_anchor_get_their_own_issuers(tmp_path: Path) -> None:
    shared = IssuerDir(tmp_path / "anchor")
    shared.init("mesh.example", anchor_lifetime=dt.timedelta(days=10),
                issuer_lifetime=dt.timedelta(days=5), now=dt.datetime.now(dt.UTC))
    issuers = []
    for name in ("east", "west"):
        state = tmp_path / name
        req = UpRequest(name=name, state_dir=state, identity_dir=shared.path)
        assert _prepare_identity(state / "identity", req) == "mesh.example"
        mine = IssuerDir(state / "identity")
        issuer = mine.load_issuer().cert
        assert issued_by(issuer, shared.load_anchor_cert())
        assert mine.load_bundle().to_pem() == shared.load_bundle().to_pem()
        assert not mine.anchor_key.exists()
        issuers.append(issuer)
    assert issuers[0].public_key() != issuers[1].public_key()
    # Running up again keeps the issuer it made.
    again = IssuerDir(tmp_path / "east" / "identity").load_issuer().cert
    _prepare_identity(tmp_path / "east" / "identity",
                      UpRequest(name="east", state_dir=tmp_path / "east",
                                identity_dir=shared.path))
    assert IssuerDir(tmp_path / "east" / "identity").load_issuer().cert == again


def test_without_an_anchor_a_cluster_makes_its_own(tmp_path: Path) -> None:
    req = UpRequest(name="solo", state_dir=tmp_path, trust_domain="solo.example")
    assert _prepare_identity(tmp_path / "identity", req) == "solo.example"
    mine = IssuerDir(tmp_path / "identity")
    assert issued_by(mine.load_issuer().cert, mine.load_anchor_cert())
