"""The listener's TLS: the configured certificate, or a self-signed one made on first start;
what a failed handshake is told in the log (what the client offered, and the hint)."""

from __future__ import annotations

import asyncio.sslproto as sslproto
import datetime
import ipaddress
import logging
import os
import ssl
import warnings
from pathlib import Path

from relayd.config import ServerConfig
from relayd.platform.fs import write_atomic

log = logging.getLogger(__name__)

SELF_SIGNED_DAYS = 3650
HELLO_PEEK_BYTES = 11  # TLS record header + ClientHello header up to its legacy_version
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


class HelloRecorder(sslproto.SSLProtocol):
    """asyncio's TLS layer, keeping the first bytes the client sent, so that a failed
    handshake can say what the client offered."""

    hello = b""
    _view: memoryview | None = None

    def get_buffer(self, n: int) -> memoryview:
        self._view = super().get_buffer(n)
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if len(self.hello) < HELLO_PEEK_BYTES and self._view is not None:
            self.hello += bytes(self._view[:min(nbytes, HELLO_PEEK_BYTES - len(self.hello))])
        super().buffer_updated(nbytes)


# ClientHello legacy_version -> name; TLS 1.3 clients also say 0x0303 there.
_TLS_NAMES = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2/1.3"}


def offered_version(hello: bytes) -> int | None:
    """The legacy_version of a TLS ClientHello (0x0301 for TLS 1.0), or None when the bytes
    are not the start of one. TLS 1.3 clients say 0x0303 here too, which is fine: only
    versions below 1.2 fail for their version."""
    if len(hello) < HELLO_PEEK_BYTES or hello[0] != 0x16 or hello[5] != 0x01:
        return None
    return int.from_bytes(hello[9:11], "big")


def describe_tls_failure(hello: bytes, error: BaseException | None,
                         server: ServerConfig, where: str = "after STARTTLS") -> str:
    """One line on why a handshake failed, with the hint an admin needs."""
    version = offered_version(hello)
    if version is None:
        if not hello:
            return "no TLS hello from the client (it closed the connection or timed out)"
        return f"the client did not start a TLS handshake {where}"
    minimum = ssl.TLSVersion.TLSv1 if server.tls_legacy else ssl.TLSVersion.TLSv1_2
    name = _TLS_NAMES.get(version, f"version 0x{version:04x}")
    if version < minimum:
        if server.tls_legacy:
            return f"it offered {name} at most, below TLS 1.0 (server.tls_legacy = true)"
        return (f"it offered {name} at most; relayd takes TLS 1.2 and later "
                "(server.tls_legacy = true also allows TLS 1.0 and 1.1)")
    # OpenSSL's reason code (NO_SHARED_CIPHER), never the exception's text with its internals.
    reason = getattr(error, "reason", None)
    trust = ("give server.tls_cert a certificate the client trusts, for the name it connects "
             "to" if server.tls_cert else "relayd's own certificate is self-signed: give "
             "server.tls_cert one the client trusts, or make the client trust this one")
    if isinstance(reason, str) and "ALERT" in reason and ("CERTIFICATE" in reason
                                                          or "UNKNOWN_CA" in reason):
        # the client's alert: "tlsv1 alert unknown ca", "sslv3 alert bad certificate"
        alert = reason.split("ALERT_", 1)[-1].replace("_", " ").lower()
        return f"the client refused relayd's certificate ({alert}; it offered {name}); {trust}"
    if reason is None and isinstance(error, (ConnectionError, EOFError, ssl.SSLEOFError)):
        # .NET and others just close the connection when they do not trust the certificate
        return (f"the client closed the connection during the handshake (it offered {name}); "
                f"most often it does not trust the certificate: {trust}")
    text = str(reason or type(error).__name__)
    return f"it offered {name}: {text.replace('_', ' ').lower()}"
