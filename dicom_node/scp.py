"""The DICOM listener: Verification (C-ECHO) and Storage (C-STORE) SCP, PS3.4 Annexes A and B.

Each C-STORE is handed to the :class:`~dicom_node.ingest.Ingestor` with the bytes exactly as they arrived
(pynetdicom issue #367: no decode and re-encode), and answered only after the instance is durable and indexed.

Before an association is negotiated, a calling AE title bound to source addresses must come from one of them,
and the storage root must keep its floor of free space; otherwise the association is rejected (PS3.8 9.3.4).
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any, NamedTuple

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, Association, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.audit.associations import ReceivedAssociations
from dicom_node.config import DicomSettings, ListenerTlsSettings
from dicom_node.ingest import Ingestor, Rejected
from dicom_node.status import EchoStatus, StoreStatus

log = logging.getLogger(__name__)

XRAY_STORAGE_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)

_MAX_ERROR_COMMENT = 64  # VR LO

Network = IPv4Network | IPv6Network


class AssociateRejection(NamedTuple):
    """The result, source and reason of an A-ASSOCIATE-RJ (PS3.8 section 9.3.4, Table 9-21)."""

    result: int
    source: int
    reason: int


CALLING_AE_NOT_RECOGNISED = AssociateRejection(result=0x01, source=0x01, reason=0x03)  # permanent, service user
LOCAL_LIMIT_EXCEEDED = AssociateRejection(result=0x02, source=0x03, reason=0x02)  # transient, presentation


@dataclass
class DiskGuard:
    """A floor of free space under the storage root, below which the node takes nothing new."""

    root: Path
    min_free_bytes: int

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self, incoming_bytes: int = 0) -> bool:
        """Whether ``incoming_bytes`` more can be written without going below the floor; not when the free space
        cannot be read (the storage root unmounted or failing)."""
        try:
            return self.free_bytes() - incoming_bytes >= self.min_free_bytes
        except OSError:
            return False


def comes_from_bound_address(bindings: Mapping[str, Sequence[Network]], calling_ae: str, address: str) -> bool:
    """Whether ``address`` is one of those ``calling_ae`` is bound to; a title bound to none may come from any."""
    networks = bindings.get(calling_ae.strip())
    if networks is None:
        return True
    host: IPv4Address | IPv6Address = ip_address(address)
    # A dual-stack listener sees an IPv4 caller as ::ffff:a.b.c.d.
    host = getattr(host, "ipv4_mapped", None) or host
    return any(host in network for network in networks)


def make_association_check(bindings: Mapping[str, Sequence[Network]], disk: DiskGuard) -> Callable[[Event], None]:
    """The EVT_REQUESTED handler: reject an association from an address its calling AE title is not bound to
    (rejected-permanent, calling AE title not recognised), or any while free space is below the floor
    (rejected-transient, local limit exceeded), before it is negotiated (PS3.8 section 9.3.4)."""

    def check_association(event: Event) -> None:
        association = event.assoc
        try:
            rejection = refusal(association.requestor.primitive.calling_ae_title, association.requestor.address)
        except Exception as error:  # pynetdicom logs a failing EVT_REQUESTED handler and accepts: fail closed
            log.error("admission check failed (%s): association rejected", type(error).__name__)
            rejection = LOCAL_LIMIT_EXCEEDED
        if rejection is not None:
            _reject(association, rejection)

    def refusal(calling_ae: str, address: str) -> AssociateRejection | None:
        if not comes_from_bound_address(bindings, calling_ae, address):
            log.warning("rejected association from %s at %s: not an address bound to that title", calling_ae, address)
            return CALLING_AE_NOT_RECOGNISED
        if not disk.has_room():
            log.warning(
                "rejected association from %s: free space under %s is below the floor of %d MiB, or unreadable",
                calling_ae,
                disk.root,
                disk.min_free_bytes >> 20,
            )
            return LOCAL_LIMIT_EXCEEDED
        return None

    return check_association


def _reject(association: Association, rejection: AssociateRejection) -> None:
    # As pynetdicom does for its own rejections: tell the EVT_REJECTED handlers (the audit trail), then wait until
    # the peer has read the rejection and closed.
    association.acse.send_reject(*rejection)
    evt.trigger(association, evt.EVT_REJECTED, {})
    association.kill()


class _DeferredHandshakeContext(ssl.SSLContext):
    """pynetdicom wraps each accepted connection in the listener's one thread, so a handshake there would let a
    caller that sends nothing stall every other caller: it is left to :func:`complete_handshake`, in the
    connection's own thread."""

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, **options: Any) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side, **(options | {"do_handshake_on_connect": False}))


def listener_ssl_context(tls: ListenerTlsSettings) -> ssl.SSLContext:
    """The server side of DICOM over TLS (PS3.15 B.1): TLS 1.2 or later and the node's certificate; with a CA,
    callers must present a certificate it signed."""
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def storage_sop_classes(accept_all_storage: bool) -> tuple[str, ...]:
    """The storage SOP classes offered as SCP: the X-ray set, or every storage class pynetdicom knows."""
    if not accept_all_storage:
        return XRAY_STORAGE_SOP_CLASSES
    return tuple(context.abstract_syntax for context in AllStoragePresentationContexts)


def handle_echo(event: Event) -> int:
    """C-ECHO: the node is alive."""
    return EchoStatus.SUCCESS


def bound_silence(timeout: float) -> Callable[[Event], None]:
    """An EVT_CONN_OPEN handler: a peer silent for ``timeout`` seconds in the middle of a PDU loses its connection.

    pynetdicom times out an idle association between PDUs, but reads the rest of a PDU (PS3.8 9.3: its length
    comes first) on the accepted socket, which has no timeout: a peer that stops mid-PDU would hold its
    association, and a slot of ``max_associations``, for ever. A read that times out closes the connection.
    """

    def handle_open(event: Event) -> None:
        event.assoc.dul.socket.socket.settimeout(timeout)

    return handle_open


def complete_handshake(event: Event) -> None:
    """The EVT_CONN_OPEN handler of a TLS listener: the TLS handshake (PS3.15 B.1). A caller that fails it (plain
    TCP, an untrusted or missing certificate, silence) is logged and disconnected before any DICOM is read."""
    connection = event.assoc.dul.socket.socket
    try:
        connection.do_handshake()
    except OSError as error:  # ssl.SSLError, or the timeout of bound_silence
        log.warning("TLS handshake with %s failed: %s", event.address[0], getattr(error, "reason", None) or error)
        connection.close()


def make_store_handler(
    ingestor: Ingestor,
    disk: DiskGuard,
    on_refused: Callable[[StoreStatus], None] = lambda status: None,
    associations: ReceivedAssociations | None = None,
):
    """The EVT_C_STORE handler: ingest the raw dataset, answer with the outcome's status (``on_refused`` counts
    the refusals, ``associations`` keeps what each association carried for the audit trail); a dataset that would
    take free space below the floor is refused with Out of Resources (PS3.4 Table B.2-1)."""

    def handle_store(event: Event) -> int | Dataset:
        request = event.request
        calling_ae = event.assoc.requestor.ae_title
        file_meta = event.file_meta
        file_meta.SourceApplicationEntityTitle = calling_ae
        dataset = request.DataSet.getbuffer()
        try:
            if not disk.has_room(dataset.nbytes):
                raise Rejected(StoreStatus.OUT_OF_RESOURCES, "free disk space is below the node's floor")
            result = ingestor.ingest(
                file_meta,
                [dataset],
                calling_ae=calling_ae,
                expected_sop_class_uid=request.AffectedSOPClassUID,
            )
        except Rejected as rejection:
            log.warning(
                "refused %s from %s: 0x%04X %s",
                request.AffectedSOPInstanceUID,
                calling_ae,
                rejection.status,
                rejection.reason,
            )
            on_refused(rejection.status)
            if associations is not None:
                associations.refused(event)
            return _failure(rejection.status, rejection.reason)
        log.info("%s %s from %s", result.outcome, result.sop_instance_uid, calling_ae)
        if associations is not None:
            associations.stored(event, result.patient_id, result.study_instance_uid)
        return StoreStatus.SUCCESS

    return handle_store


def _failure(status: StoreStatus, reason: str) -> Dataset:
    response = Dataset()
    response.Status = int(status)
    response.ErrorComment = reason[:_MAX_ERROR_COMMENT]
    return response


@dataclass
class StorageSCP:
    """The node's listening Application Entity."""

    settings: DicomSettings
    ingestor: Ingestor
    disk: DiskGuard
    on_refused: Callable[[StoreStatus], None] = lambda status: None
    associations: ReceivedAssociations | None = None

    def __post_init__(self) -> None:
        self._server: ThreadedAssociationServer | None = None

    def build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu_size
        ae.maximum_associations = self.settings.max_associations
        ae.acse_timeout = self.settings.acse_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.network_timeout = self.settings.network_timeout
        ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for sop_class in storage_sop_classes(self.settings.accept_all_storage):
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        """Start listening in background threads; one thread per association."""
        handlers = [
            (evt.EVT_REQUESTED, make_association_check(self.settings.calling_ae_addresses, self.disk)),
            (evt.EVT_CONN_OPEN, bound_silence(self.settings.network_timeout)),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, make_store_handler(self.ingestor, self.disk, self.on_refused, self.associations)),
        ]
        if self.associations is not None:
            handlers += self.associations.handlers()
        tls = self.settings.tls
        if tls:  # after bound_silence, whose timeout bounds the handshake
            handlers.append((evt.EVT_CONN_OPEN, complete_handshake))
        self._server = self.build_ae().start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=listener_ssl_context(tls) if tls else None,
        )
        log.info(
            "DICOM listener %s on %s:%d%s",
            self.settings.ae_title,
            self.settings.host,
            self.settings.port,
            " (TLS)" if tls else "",
        )

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.socket is not None and self._server.socket.fileno() >= 0

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting associations, give open ones ``grace`` seconds to finish, then abort them."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        deadline = time.monotonic() + grace
        for association in list(server.active_associations):
            association.join(max(deadline - time.monotonic(), 0.0))
            if association.is_alive():
                association.abort()
                association.join(5.0)
