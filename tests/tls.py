"""Certificates for TLS tests (PS3.15 B.1), made by openssl: a CA and the certificates it signs for 127.0.0.1."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA in ``directory``; :meth:`issue` signs certificates with it."""

    directory: Path
    certificate: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> CertificateAuthority:
        directory.mkdir(parents=True)
        _openssl(
            directory,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
        )
        return cls(directory, directory / "ca.pem", directory / "ca.key")

    def issue(self, name: str) -> tuple[Path, Path]:
        """A certificate for ``name`` (its common name and file stem) and 127.0.0.1: (certificate, key)."""
        extensions = self.directory / f"{name}.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl(
            self.directory,
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        _openssl(
            self.directory,
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            extensions.name,
        )
        return self.directory / f"{name}.pem", self.directory / f"{name}.key"


def certificate_authority(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for 127.0.0.1: (ca, certificate, key)."""
    authority = CertificateAuthority.create(directory, name)
    return (authority.certificate, *authority.issue("server"))
