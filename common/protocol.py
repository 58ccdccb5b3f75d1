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

# ------------------------------------------------------------------ Flower messages
# The ServerApp and the ClientApp read what the other wrote under these names; a name spelled on
# one side only is a message the other side silently ignores.

#: ``query.<name>`` message types (the ClientApp registers them with ``@app.query(name)``).
QUERY_PENDING = "pending"
QUERY_UNLEARN = "unlearn"
QUERY_RELEASE = "release"

#: Record names in a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
IMPORTANCE = "importance"
PENDING = "pending"
ENVELOPE = "envelope"
NODE_INFO = "node-info"

#: Keys inside the config records. One concept, one name: a deletion request is ``request_id``
#: in Python and ``request-ids`` / ``applied-request-ids`` / ``retry-request-ids`` on the wire.
SERVER_ROUND = "server-round"
WANT_IMPORTANCE = "importance"
NODE_ID = "node-id"
REQUEST_IDS = "request-ids"
N_UTTS = "n-utts"
BASE_VERSION = "base-version"
BASE_SHA256 = "base-sha256"
#: hash of the tensors that stay on the devices (common.traffic): both sides must hold the same frozen rest
FROZEN_SHA256 = "frozen-sha256"
TARGET_FORGET_ACC = "target-forget-acc"
RELEASE_VERSION = "version"
APPLIED_REQUEST_IDS = "applied-request-ids"
RETRY_REQUEST_IDS = "retry-request-ids"
RETRY_REASON = "retry-reason"
RELEASE_MANIFESTS = "release-manifests"
RELEASE_SIGNATURES = "release-signatures"
DEVICE = "device"
DEVICE_NOTE = "device-note"
#: The metric FedAvg weights by (Flower's default ``weighted_by_key``).
NUM_EXAMPLES = "num-examples"
