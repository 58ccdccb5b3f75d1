"""Throughput of the delta envelope (HPKE + Ed25519) against raw AES-256-GCM.

Why: every unlearning request ships a weight delta through :mod:`serforget.common.envelope`. This measures
what the envelope costs on top of the bulk cipher it is built on, on the same payloads in the same
run, so the ratio is meaningful on whatever machine it runs on. The envelope does more than AES:
it hashes the payload (SHA-256, ``payload_sha256``), Ed25519 signs/verifies the whole ciphertext
(SHA-512 twice to sign, once to verify) and copies buffers while framing, so the component rows
(SHA-256, Ed25519 sign/verify alone) are measured too, to show where the difference goes.

Each operation is timed ``repeats`` times (each sample loops enough to cover ~8 MB, so 100 KB
payloads are not dominated by timer noise) and the median per-operation time is reported.
Throughput is payload bytes / time in MB/s (1 MB = 10^6 bytes).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_crypto

Writes ``benchmarks/results/crypto.json`` and ``benchmarks/results/crypto.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from serforget.common.envelope import open_delta, seal_delta
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.keys import SUITE_MLKEM768_X25519, SUITE_X25519, pq_hybrid_available

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SIZES = (100_000, 1_000_000, 10_000_000)
BYTES_PER_SAMPLE = 8_000_000
BASE_SHA = hashlib.sha256(b"benchmark base model").hexdigest()
RESULT_VERSION = 1


@dataclass(frozen=True)
class SuiteKeys:
    """The key material one suite needs: server HPKE pair and a node signing key."""

    name: str
    hpke_suite: hpke.Suite
    server_private: Any
    server_public: Any
    node_key: ed25519.Ed25519PrivateKey


def make_suite_keys(name: str) -> SuiteKeys:
    x_key = x25519.X25519PrivateKey.generate()
    if name == SUITE_X25519:
        private: Any = x_key
        kem = hpke.KEM.X25519
    else:
        private = hpke.MLKEM768X25519PrivateKey(mlkem.MLKEM768PrivateKey.generate(), x_key)
        kem = hpke.KEM.MLKEM768_X25519
    return SuiteKeys(
        name=name,
        hpke_suite=hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
        server_private=private,
        server_public=private.public_key(),
        node_key=ed25519.Ed25519PrivateKey.generate(),
    )


def median_seconds(operation: Callable[[], object], *, size: int, repeats: int) -> float:
    """Median seconds per call of ``operation`` over ``repeats`` samples (after one warm-up)."""
    operation()
    number = max(1, BYTES_PER_SAMPLE // size)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            operation()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def aes_operations(payload: bytes) -> dict[str, Callable[[], object]]:
    """Raw AES-256-GCM, a fresh nonce per encryption as a real sender would use."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(12)
    ciphertext = aead.encrypt(nonce, payload, None)
    return {
        "aes256gcm_encrypt": lambda: aead.encrypt(os.urandom(12), payload, None),
        "aes256gcm_decrypt": lambda: aead.decrypt(nonce, ciphertext, None),
    }


def component_operations(payload: bytes, node_key: ed25519.Ed25519PrivateKey) -> dict[str, Callable[[], object]]:
    """The envelope's non-AES work, measured alone to explain the ratio."""
    public = node_key.public_key()
    signature = node_key.sign(payload)
    return {
        "sha256": lambda: hashlib.sha256(payload).digest(),
        "ed25519_sign": lambda: node_key.sign(payload),
        "ed25519_verify": lambda: public.verify(signature, payload),
    }


def suite_operations(payload: bytes, keys: SuiteKeys) -> dict[str, Callable[[], object]]:
    """HPKE alone and the full envelope (HPKE + Ed25519 + header checks) for one suite."""
    info = b"benchmark header"
    sealed = keys.hpke_suite.encrypt(payload, keys.server_public, info=info)

    def seal() -> bytes:
        return seal_delta(
            payload=payload,
            node_id="bench-node",
            request_ids=["bench-request"],
            base_version=1,
            base_sha256=BASE_SHA,
            server_hpke_public=keys.server_public,
            node_signing_key=keys.node_key,
            max_payload_bytes=len(payload),
        )

    envelope = seal()
    node_keys = {"bench-node": keys.node_key.public_key()}

    def open_() -> tuple[Any, bytes]:
        return open_delta(
            envelope=envelope,
            server_hpke_private=keys.server_private,
            node_keys=node_keys,
            expected_base_version=1,
            expected_base_sha256=BASE_SHA,
            seen_ids=frozenset(),
            max_payload_bytes=len(payload),
        )

    return {
        f"hpke_{keys.name}_encrypt": lambda: keys.hpke_suite.encrypt(payload, keys.server_public, info=info),
        f"hpke_{keys.name}_decrypt": lambda: keys.hpke_suite.decrypt(sealed, keys.server_private, info=info),
        f"envelope_{keys.name}_seal": seal,
        f"envelope_{keys.name}_open": open_,
    }


def measure_size(*, size: int, repeats: int, suites: Sequence[SuiteKeys]) -> dict[str, Any]:
    """All operations on one payload size; returns seconds, MB/s and ratios to AES-GCM."""
    payload = os.urandom(size)
    operations = aes_operations(payload) | component_operations(payload, suites[0].node_key)
    for keys in suites:
        operations |= suite_operations(payload, keys)
    seconds = {name: median_seconds(op, size=size, repeats=repeats) for name, op in operations.items()}
    mb_per_s = {name: size / 1e6 / value for name, value in seconds.items()}
    ratios = {}
    for keys in suites:
        for direction, aes_name in (("seal", "aes256gcm_encrypt"), ("open", "aes256gcm_decrypt")):
            name = f"envelope_{keys.name}_{direction}"
            ratios[f"{name}_vs_{aes_name}"] = mb_per_s[name] / mb_per_s[aes_name]
    return {"payload_bytes": size, "median_seconds": seconds, "mb_per_s": mb_per_s, "throughput_ratio": ratios}


def environment() -> dict[str, Any]:
    """What the numbers depend on, so results from different machines are not mixed up."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
        "pq_hybrid_available": pq_hybrid_available(),
    }


def run_benchmark(*, sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    """Measure every size with every available suite; returns the JSON-ready result."""
    names = [SUITE_X25519] + ([SUITE_MLKEM768_X25519] if pq_hybrid_available() else [])
    suites = [make_suite_keys(name) for name in names]
    started = time.perf_counter()
    rows = []
    for size in sizes:
        rows.append(measure_size(size=size, repeats=repeats, suites=suites))
        print_row(rows[-1], suites=names)
    return {
        "benchmark": "crypto",
        "version": RESULT_VERSION,
        "created_at": time.time(),
        "repeats": repeats,
        "bytes_per_sample": BYTES_PER_SAMPLE,
        "suites": names,
        "environment": environment(),
        "wall_seconds": time.perf_counter() - started,
        "results": rows,
    }


def print_row(row: dict[str, Any], *, suites: Sequence[str]) -> None:
    mb = row["mb_per_s"]
    print(
        f"payload {row['payload_bytes']:>11,} B: AES-GCM enc {mb['aes256gcm_encrypt']:8.0f} MB/s, dec {mb['aes256gcm_decrypt']:8.0f} MB/s"
    )
    for suite in suites:
        seal, open_ = mb[f"envelope_{suite}_seal"], mb[f"envelope_{suite}_open"]
        print(
            f"  {suite:<16} seal {seal:8.0f} MB/s ({seal / mb['aes256gcm_encrypt']:.2f}x AES)"
            f"   open {open_:8.0f} MB/s ({open_ / mb['aes256gcm_decrypt']:.2f}x AES)"
        )


def _primitive_table(result: dict[str, Any]) -> list[str]:
    columns = {
        "aes256gcm_encrypt": "AES-256-GCM enc",
        "aes256gcm_decrypt": "AES-256-GCM dec",
        "sha256": "SHA-256",
        "ed25519_sign": "Ed25519 sign",
        "ed25519_verify": "Ed25519 verify",
    }
    lines = ["## Primitives alone (MB/s)", "", "| payload | " + " | ".join(columns.values()) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for row in result["results"]:
        values = " | ".join(f"{row['mb_per_s'][key]:.0f}" for key in columns)
        lines.append(f"| {row['payload_bytes']:,} B | {values} |")
    return lines


def _suite_table(result: dict[str, Any], suite: str) -> list[str]:
    """Envelope vs AES for one suite, plus the share of seal time each component accounts for."""
    lines = [
        f"## Suite `{suite}`",
        "",
        "| payload | HPKE enc MB/s | HPKE dec MB/s | seal MB/s | open MB/s | seal / AES enc | open / AES dec "
        "| seal time: Ed25519 sign | seal time: SHA-256 | seal time: HPKE enc |",
        "|---" * 10 + "|",
    ]
    for row in result["results"]:
        mb, sec = row["mb_per_s"], row["median_seconds"]
        seal_s = sec[f"envelope_{suite}_seal"]
        shares = [sec["ed25519_sign"] / seal_s, sec["sha256"] / seal_s, sec[f"hpke_{suite}_encrypt"] / seal_s]
        lines.append(
            f"| {row['payload_bytes']:,} B | {mb[f'hpke_{suite}_encrypt']:.0f} | {mb[f'hpke_{suite}_decrypt']:.0f} "
            f"| {mb[f'envelope_{suite}_seal']:.0f} | {mb[f'envelope_{suite}_open']:.0f} "
            f"| {row['throughput_ratio'][f'envelope_{suite}_seal_vs_aes256gcm_encrypt']:.3f} "
            f"| {row['throughput_ratio'][f'envelope_{suite}_open_vs_aes256gcm_decrypt']:.3f} | "
            + " | ".join(f"{share:.0%}" for share in shares)
            + " |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    """A human-readable rendering of the same numbers as the JSON."""
    env = result["environment"]
    lines = [
        "# Delta envelope crypto throughput",
        "",
        f"Generated by `benchmarks/bench_crypto.py`: median of {result['repeats']} samples per operation, "
        f"MB = 10^6 bytes, {result['wall_seconds']:.1f} s wall. cryptography {env['cryptography']}, "
        f"{env['openssl']}, Python {env['python']}, {env['cpu']} ({env['cpu_count']} CPUs).",
        "",
        "Seal = SHA-256 of the payload + HPKE encrypt (header as `info`) + Ed25519 sign over the frame; "
        "open = Ed25519 verify + HPKE decrypt + SHA-256 check. Ratios are envelope MB/s divided by raw "
        "AES-256-GCM MB/s on the same payload (1.0 would mean the envelope costs nothing extra). The "
        "'seal time' columns give each primitive's time alone as a share of the seal time.",
        "",
        *_primitive_table(result),
    ]
    for suite in result["suites"]:
        lines += ["", *_suite_table(result, suite)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="payload sizes in bytes")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per operation (median reported)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where crypto.json and crypto.md go")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(size < 1 for size in args.sizes):
        parser.error("--repeats and every --sizes value must be >= 1")
    result = run_benchmark(sizes=args.sizes, repeats=args.repeats)
    atomic_write_json(args.out_dir / "crypto.json", result)
    atomic_write_text(args.out_dir / "crypto.md", markdown(result))
    print(f"wrote {args.out_dir / 'crypto.json'} and {args.out_dir / 'crypto.md'} in {result['wall_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
