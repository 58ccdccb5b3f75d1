"""Protocol constants both sides share: file names that cross hosts, and the names of the pins.

Why one module: the device and the aggregator must agree on every name that travels between
them or is written on one side and read on the other; a name spelled twice drifts.
"""

from __future__ import annotations

#: File, under a node's ``keys/`` folder, holding the server's pinned HPKE public key: deltas are
#: sealed to this key only, so a server that swaps keys cannot read a device's delta.
SERVER_HPKE_PIN = "server_hpke.pub"
#: File, under a node's ``keys/`` folder, holding the server's pinned Ed25519 release key: a node
#: adopts weights or purges audio only on a release manifest signed by this key.
SERVER_SIGN_PIN = "server_sign.pub"
