"""A syslog collector for tests: RFC 5425 (syslog over TLS) on a loopback port, keeping the RFC 5424 messages it reads.

Its certificates are made at test time with ``cryptography``: a CA of its own and a server certificate for 127.0.0.1
and localhost (or other names, to test host name verification). It can stop (closing its connections, as a
collector that goes away) and start again on the same port.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import socketserver
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.dicom_peers import free_port

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, and a certificate with its key that the CA signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(
    directory: Path, name: str, *, addresses: tuple[str, ...] = (LOOPBACK,), dns_names: tuple[str, ...] = ("localhost",)
) -> Certificates:
    """A new CA "``name`` CA" and a certificate it signs for ``addresses`` and ``dns_names``, written in ``directory``.

    The certificate serves as a server's and as a client's (both extended key usages).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    names += [x509.DNSName(dns_name) for dns_name in dns_names]
    certificate = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certificates = Certificates(directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / f"{name}.key")
    certificates.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certificates.cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    certificates.key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certificates


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class SyslogMessage:
    """An RFC 5424 SYSLOG-MSG, split into its fields; ``msg`` as received (a UTF-8 MSG begins with the BOM)."""

    pri: str
    version: str
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes

    @classmethod
    def parse(cls, syslog_msg: bytes) -> SyslogMessage:
        """Splits a message whose STRUCTURED-DATA is the NILVALUE (the only kind this collector is sent)."""
        prival_version, timestamp, hostname, app_name, procid, msgid, rest = syslog_msg.split(b" ", 6)
        structured_data, _, msg = rest.partition(b" ")
        pri, _, version = prival_version.decode("ascii").partition(">")
        return cls(
            pri=pri + ">",
            version=version,
            timestamp=timestamp.decode("ascii"),
            hostname=hostname.decode("ascii"),
            app_name=app_name.decode("ascii"),
            procid=procid.decode("ascii"),
            msgid=msgid.decode("ascii"),
            structured_data=structured_data.decode("ascii"),
            msg=msg,
        )


class SyslogCollector:
    """A TLS syslog collector on ``port`` (a free one by default) of 127.0.0.1, presenting ``certificates``.

    With ``client_ca`` it requires a client certificate signed by that CA. ``frames`` are the SYSLOG-MSGs of the
    octet-counted frames received, in order, across restarts; ``accepted`` counts the TLS connections accepted.
    """

    def __init__(self, certificates: Certificates, *, port: int | None = None, client_ca: Path | None = None) -> None:
        self.certificates = certificates
        self.port = port or free_port()
        self.frames: list[bytes] = []
        self.accepted = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(certificates.cert_file, certificates.key_file)
        if client_ca is not None:
            self._context.load_verify_locations(client_ca)
            self._context.verify_mode = ssl.CERT_REQUIRED
        self._received = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None

    @property
    def messages(self) -> list[SyslogMessage]:
        """The messages received, in order."""
        with self._received:
            return [SyslogMessage.parse(frame) for frame in self.frames]

    def start(self) -> SyslogCollector:
        """Listens (again) on the collector's port."""
        self._server = _Server((LOOPBACK, self.port), _Connection)
        self._server.collector = self
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="syslog-collector", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        """Stops listening and closes every connection, as a collector that goes away."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._received:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed already, or taken over by its TLS socket
            self._connections.clear()
        self._server = None

    def wait_for(self, count: int, timeout: float = 5.0) -> list[SyslogMessage]:
        """The messages once ``count`` have arrived; AssertionError after ``timeout`` seconds without them."""
        with self._received:
            if not self._received.wait_for(lambda: len(self.frames) >= count, timeout):
                raise AssertionError(f"{len(self.frames)} syslog messages arrived, not {count}")
        return self.messages

    def __enter__(self) -> SyslogCollector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self, connection: socket.socket) -> None:
        """Reads octet-counted frames from one client until it closes the connection."""
        with self._received:
            self._connections.add(connection)  # for a stop during the handshake
        try:
            tls = self._context.wrap_socket(connection, server_side=True)
        except OSError:
            return  # a client that does not trust this collector, or one it does not trust
        with self._received:
            self._connections.add(tls)  # the TLS socket took over the connection's descriptor
            self.accepted += 1
        reader = tls.makefile("rb")
        try:
            while (frame := _read_frame(reader)) is not None:
                with self._received:
                    self.frames.append(frame)
                    self._received.notify_all()
        except OSError:
            pass  # stopped under the read
        finally:
            reader.close()
            tls.close()


def _read_frame(reader: BinaryIO) -> bytes | None:
    """One ``MSG-LEN SP SYSLOG-MSG`` frame's SYSLOG-MSG (RFC 5425 Section 4.3); None at the end of the stream."""
    length = b""
    while (digit := reader.read(1)) != b" ":
        if not digit:
            return None
        length += digit
    return reader.read(int(length))


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # to listen again on the port that a stopped collector's connections still hold
    daemon_threads = True
    collector: SyslogCollector


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.collector._serve(self.request)
