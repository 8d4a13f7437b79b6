"""Workload identity: the trust anchor and issuer, the certificate service that
signs workload certificates, the client-side certificate store with renewal,
trust bundles with several anchors, and identity names."""
