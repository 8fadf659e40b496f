"""Operator tooling and the provider's and auditor's services: everything that runs on a
host, outside any node or aggregator sandbox.

Nothing in this package is in the FAB or in a code measurement
(``sandbox.attestation.measure.SANDBOX_CODE``), so editing the CLI, provisioning, the
launchers, the demo data, the key broker's service or the audit report never changes
what nodes approved or what a sandbox attests to.
"""
