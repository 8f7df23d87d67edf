"""Who may associate with the node: calling AE titles bound to source addresses (PS3.8 A-ASSOCIATE-RJ), and DICOM
over TLS (PS3.15 B.1) with and without client certificates, against real peers (pynetdicom; DCMTK's echoscu and
storescu) on loopback, whose 127.0.0.0/8 gives several source addresses."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dicom_node.config import ConfigError, load_settings
from dicom_node.node import Node
from dicom_node.synthetic import write_synthetic_dx
from tests.conftest import NodeFactory, stored_instances
from tests.dicom_peers import NODE_AE, associate, dcmtk, rejection
from tests.tls import CertificateAuthority

CALLING_AE_NOT_RECOGNISED = ("Rejected Permanent", "Service User", "Calling AE title not recognised")


def test_a_bound_title_is_accepted_from_its_addresses_and_networks_only(start_node: NodeFactory) -> None:
    node = start_node(
        allowed_calling_aets=["MODALITY1"], calling_ae_addresses={"MODALITY1": ["127.0.0.2", "127.0.1.0/24"]}
    )
    port = node.settings.dicom.port
    for address in ("127.0.0.2", "127.0.1.7"):
        assert associate(port, calling_aet="MODALITY1", bind_address=address).is_released, address
    assert rejection(associate(port, calling_aet="MODALITY1", bind_address="127.0.2.1")) == CALLING_AE_NOT_RECOGNISED


def test_an_allowed_ae_from_an_unbound_address_is_rejected(start_node: NodeFactory, tmp_path: Path) -> None:
    node = start_node(calling_ae_addresses={"MODALITY1": ["127.0.0.2"]})
    port = node.settings.dicom.port
    [source] = write_synthetic_dx(tmp_path / "in", 1, side=64)

    assert rejection(associate(port, calling_aet="MODALITY1", bind_address="127.0.0.1")) == CALLING_AE_NOT_RECOGNISED
    stored = dcmtk("storescu", "-aet", "MODALITY1", "-aec", NODE_AE, "127.0.0.1", port, source)
    assert stored.returncode != 0
    assert "Calling AE Title Not Recognized" in stored.stderr + stored.stdout
    assert stored_instances(node) == []
    assert associate(port, calling_aet="OTHER", bind_address="127.0.0.1").is_released, "an unbound title is free"


def test_an_address_binding_for_a_title_that_is_not_allowed_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    dicom = {"allowed_calling_aets": ["ORTHANC"], "calling_ae_addresses": {"MODALITY1": ["10.0.0.5"]}}
    config.write_text(yaml.safe_dump({"dicom": dicom}))
    with pytest.raises(ConfigError, match="MODALITY1.*not in allowed_calling_aets"):
        load_settings(config)


@dataclass(frozen=True)
class Certificates:
    """The node's CA and certificates it signed; ``stranger`` was signed by another CA."""

    ca: Path
    other_ca: Path
    node: tuple[Path, Path]
    modality: tuple[Path, Path]
    stranger: tuple[Path, Path]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("pki")
    ours = CertificateAuthority.create(directory / "ours", "node CA")
    other = CertificateAuthority.create(directory / "other", "other CA")
    return Certificates(
        ours.certificate, other.certificate, ours.issue("node"), ours.issue("modality"), other.issue("stranger")
    )


def tls_node(start_node: NodeFactory, certificates: Certificates, *, client_certificates: bool) -> Node:
    certificate, key = certificates.node
    tls = {"cert_file": str(certificate), "key_file": str(key)}
    if client_certificates:
        tls["ca_file"] = str(certificates.ca)
    # A connection whose handshake failed holds its association until the ACSE timeout (pynetdicom), and the
    # node's stop waits for it.
    return start_node(tls=tls, acse_timeout=2)


def tls_client(ca: Path, certificate_and_key: tuple[Path, Path] | None = None) -> list[str | Path]:
    """DCMTK's TLS options: verify the node against ``ca``; present a certificate, or none (anonymous TLS)."""
    if certificate_and_key is None:
        return ["+tla", "+cf", ca]
    certificate, key = certificate_and_key
    return ["+tls", key, certificate, "+cf", ca]


def storescu(node: Node, source: Path, *options: str | Path) -> bool:
    result = dcmtk("storescu", *options, "-aec", NODE_AE, "127.0.0.1", node.settings.dicom.port, source, timeout=30)
    return result.returncode == 0


@pytest.fixture
def source(tmp_path: Path) -> Path:
    [path] = write_synthetic_dx(tmp_path / "in", 1, side=64)
    return path


def test_over_tls_a_client_that_trusts_the_node_ca_stores(
    start_node: NodeFactory, certificates: Certificates, source: Path
) -> None:
    node = tls_node(start_node, certificates, client_certificates=False)
    assert storescu(node, source, *tls_client(certificates.ca))
    assert len(stored_instances(node)) == 1


def test_over_tls_the_node_presents_its_configured_certificate(
    start_node: NodeFactory, certificates: Certificates, source: Path
) -> None:
    node = tls_node(start_node, certificates, client_certificates=False)
    assert not storescu(node, source, *tls_client(certificates.other_ca)), "a client of another CA must not trust it"
    assert stored_instances(node) == []


def test_a_plain_tcp_client_of_a_tls_listener_fails_stores_nothing_and_is_logged(
    start_node: NodeFactory, certificates: Certificates, source: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = tls_node(start_node, certificates, client_certificates=False)
    with caplog.at_level(logging.WARNING, logger="dicom_node.scp"):
        assert not storescu(node, source)
    assert stored_instances(node) == []
    assert "TLS handshake with 127.0.0.1 failed: WRONG_VERSION_NUMBER" in caplog.messages


def test_with_a_ca_file_a_client_certificate_the_ca_signed_stores(
    start_node: NodeFactory, certificates: Certificates, source: Path
) -> None:
    node = tls_node(start_node, certificates, client_certificates=True)
    assert storescu(node, source, *tls_client(certificates.ca, certificates.modality))
    assert len(stored_instances(node)) == 1


@pytest.mark.parametrize("client", ["no certificate", "a certificate of another CA"])
def test_with_a_ca_file_a_client_without_a_trusted_certificate_stores_nothing(
    start_node: NodeFactory, certificates: Certificates, source: Path, client: str
) -> None:
    node = tls_node(start_node, certificates, client_certificates=True)
    presented = None if client == "no certificate" else certificates.stranger
    assert not storescu(node, source, *tls_client(certificates.ca, presented))
    assert stored_instances(node) == []


def test_a_silent_connection_does_not_hold_up_other_tls_callers(
    start_node: NodeFactory, certificates: Certificates
) -> None:
    node = tls_node(start_node, certificates, client_certificates=False)
    with socket.create_connection(("127.0.0.1", node.settings.dicom.port)):  # connects and never says a word
        echo = dcmtk(
            "echoscu", *tls_client(certificates.ca), "-aec", NODE_AE, "127.0.0.1", node.settings.dicom.port, timeout=15
        )
    assert echo.returncode == 0, echo.stderr
