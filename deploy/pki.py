"""TLS material for the SuperLink and authentication keys for SuperNodes (``cryptography`` only).

Why our own CA: SuperNodes verify the SuperLink's certificate against a root they were given
(``--root-certificates``); a private CA, created once on the operator's machine, signs the
SuperLink's certificate for exactly the host names and addresses devices dial. The CA's private
key never has to leave that machine; only ``ca.crt`` is copied to devices and to the CLI host.

SuperNode authentication keys are what Flower 1.41 expects (checked in
``flwr/supernode/cli/flower_supernode.py`` and ``flwr/cli/supernode/register.py``): an EC key on
a NIST curve (we use P-384, Flower's own default) with the private key in OpenSSH format and the
public key as an OpenSSH ``ecdsa-sha2-nistp384`` line. The public key is what an operator
registers with ``flwr supernode register``; the SuperLink then accepts only nodes that prove
possession of a registered key.

Private keys are written atomically with mode 0600; files that already exist are reused, so
re-running a provisioning step never rotates a key that is already deployed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from serforget.common.fsutil import atomic_write_bytes
from serforget.common.keys import KeyFileError, read_private_key_file

#: Validity of the CA and of the SuperLink certificate; long enough for a study, short enough
#: that a forgotten deployment does not trust its CA forever.
CA_VALID_DAYS = 3650
SERVER_CERT_VALID_DAYS = 825


class PKIError(ValueError):
    """TLS or key material is missing or unusable; the message names the file."""


@dataclass(frozen=True)
class CAFiles:
    """The CA: ``ca.crt`` goes to every SuperNode host and CLI host, ``ca.key`` stays private."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerTLSFiles:
    """What ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile`` reads."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeAuthKey:
    """A SuperNode's authentication key pair (OpenSSH encodings, EC P-384)."""

    private: Path
    public: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, *, openssh: bool) -> None:
    encoding = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, encoding, serialization.NoEncryption())
    atomic_write_bytes(path, data, mode=0o600)


def _read_private(path: Path) -> bytes:
    """A private key's bytes under common.keys' policy: a file group/others may read is refused."""
    if not path.exists():
        raise PKIError(f"{path}: private key missing")
    try:
        return read_private_key_file(path)
    except KeyFileError as exc:
        raise PKIError(str(exc)) from None


def _load_pem_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read_private(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{path}: certificate missing") from None
    except ValueError as exc:
        raise PKIError(f"{path}: not a PEM X.509 certificate ({exc})") from None


def create_ca(*, out_dir: Path, common_name: str = "serforget deployment CA") -> CAFiles:
    """Create (or reuse) a self-signed CA in ``out_dir`` (``ca.crt``, ``ca.key``)."""
    out_dir = Path(out_dir)
    files = CAFiles(out_dir / "ca.crt", out_dir / "ca.key")
    if files.cert.exists() and files.key.exists():
        _load_certificate(files.cert), _load_pem_private_key(files.key)
        return files
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private_key(files.key, key, openssh=False)
    atomic_write_bytes(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """Each host as an IP SAN when it parses as an address, else a DNS SAN (gRPC/HTTPS check SANs, not CN)."""
    if not hosts:
        raise PKIError("the SuperLink certificate needs at least one host name or IP address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue_server_certificate(*, ca: CAFiles, out_dir: Path, hosts: Sequence[str]) -> ServerTLSFiles:
    """Create (or reuse) the SuperLink's key and a certificate for ``hosts``, signed by ``ca``.

    A reused certificate must still name every requested host: adding a host re-issues it
    (same private key), so an operator who adds a public address does not get TLS failures.
    """
    out_dir = Path(out_dir)
    files = ServerTLSFiles(ca.cert, out_dir / "superlink.crt", out_dir / "superlink.key")
    wanted = _subject_alternative_names(list(hosts))
    if files.cert.exists() and files.key.exists():
        existing = _load_certificate(files.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if set(wanted) <= set(existing):
            _load_pem_private_key(files.key)  # reused as it is: still under the private-key policy
            return files
    ca_cert, ca_key = _load_certificate(ca.cert), _load_pem_private_key(ca.key)
    key = _load_pem_private_key(files.key) if files.key.exists() else ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_CERT_VALID_DAYS))
        .add_extension(wanted, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    if not files.key.exists():
        _write_private_key(files.key, key, openssh=False)
    atomic_write_bytes(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def create_node_auth_key(*, out_dir: Path, name: str = "flwr_auth") -> NodeAuthKey:
    """Create (or reuse) a SuperNode authentication key: ``NAME`` (private, OpenSSH) and ``NAME.pub``."""
    out_dir = Path(out_dir)
    files = NodeAuthKey(out_dir / name, out_dir / f"{name}.pub")
    if files.private.exists() and files.public.exists():
        _read_private(files.private)
        load_node_auth_public(files.public)
        return files
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private_key(files.private, key, openssh=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(files.public, public + b"\n")
    return files


def load_node_auth_public(path: Path) -> ec.EllipticCurvePublicKey:
    """Strictly load a SuperNode public key the way ``flwr supernode register`` will."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{path}: SuperNode public key missing") from None
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(f"{path}: SuperNode keys must be EC (NIST curve), got {type(key).__name__}")
    return key
