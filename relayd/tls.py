"""The listener's TLS: the configured certificate, or a self-signed one made on first start."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import warnings
from pathlib import Path

from relayd.config import ServerConfig
from relayd.queue import write_atomic

log = logging.getLogger(__name__)

SELF_SIGNED_DAYS = 3650
# TLS 1.2: forward-secret AEAD suites only (TLS 1.3's are AEAD anyway and set apart).
MODERN_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# tls_legacy adds TLS 1.0/1.1 for old printers and .NET Framework apps, with the ECDHE AES-CBC
# suites they speak, after the AEAD ones so that TLS 1.2+ clients still get those. OpenSSL 3
# allows TLS 1.0/1.1 only at security level 0; the list, not the level, keeps static-RSA and
# other weak suites out. Rejected: "DEFAULT:@SECLEVEL=0", which offered static RSA to all.
LEGACY_CIPHERS = MODERN_CIPHERS + ":ECDHE+AES+SHA1:@SECLEVEL=0"


def server_context(server: ServerConfig, state_dir: Path) -> ssl.SSLContext:
    """TLS 1.2+ with AEAD suites (1.0+ with tls_legacy, for old printers and scanners)."""
    cert, key = server.tls_cert, server.tls_key
    if cert is None or key is None:
        cert, key = ensure_self_signed(server.hostname, state_dir)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if server.tls_legacy:
        with warnings.catch_warnings():
            # Python deprecates TLS 1.0; allowing it is what tls_legacy is for.
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers(LEGACY_CIPHERS)
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(MODERN_CIPHERS)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert, key)
    return ctx


def ensure_self_signed(hostname: str, state_dir: Path) -> tuple[Path, Path]:
    """A certificate for `hostname` under state_dir/tls, made once and kept."""
    tls_dir = state_dir / "tls"
    cert_path, key_path = tls_dir / "selfsigned.pem", tls_dir / "selfsigned.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    os.makedirs(tls_dir, mode=0o700, exist_ok=True)
    # RSA rather than EC: old printers and scanners speak nothing else.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost"),
                                   x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                   x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(key, hashes.SHA256()))
    write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), tls_dir)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), tls_dir)
    log.warning("no server.tls_cert configured: generated a self-signed certificate for %s "
                "at %s (clients must not verify it, or set tls_cert and tls_key)",
                hostname, cert_path)
    return cert_path, key_path
