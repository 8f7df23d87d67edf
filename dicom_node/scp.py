"""The DICOM listener: Verification (C-ECHO) and Storage (C-STORE) SCP, PS3.4 Annexes A and B.

Each C-STORE is handed to the :class:`~dicom_node.ingest.Ingestor` with the bytes exactly as they arrived
(pynetdicom issue #367: no decode and re-encode), and answered only after the instance is durable and indexed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
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

from dicom_node.config import DicomSettings
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


def storage_sop_classes(accept_all_storage: bool) -> tuple[str, ...]:
    """The storage SOP classes offered as SCP: the X-ray set, or every storage class pynetdicom knows."""
    if not accept_all_storage:
        return XRAY_STORAGE_SOP_CLASSES
    return tuple(context.abstract_syntax for context in AllStoragePresentationContexts)


def handle_echo(event: Event) -> int:
    """C-ECHO: the node is alive."""
    return EchoStatus.SUCCESS


def make_store_handler(ingestor: Ingestor, on_refused: Callable[[StoreStatus], None] = lambda status: None):
    """The EVT_C_STORE handler: ingest the raw dataset, answer with the outcome's status (``on_refused`` counts
    the refusals)."""

    def handle_store(event: Event) -> int | Dataset:
        request = event.request
        calling_ae = event.assoc.requestor.ae_title
        file_meta = event.file_meta
        file_meta.SourceApplicationEntityTitle = calling_ae
        try:
            result = ingestor.ingest(
                file_meta,
                [request.DataSet.getbuffer()],
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
            return _failure(rejection.status, rejection.reason)
        log.info("%s %s from %s", result.outcome, result.sop_instance_uid, calling_ae)
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
    on_refused: Callable[[StoreStatus], None] = lambda status: None

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
        store = make_store_handler(self.ingestor, self.on_refused)
        handlers = [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, store)]
        self._server = self.build_ae().start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
        )
        log.info("DICOM listener %s on %s:%d", self.settings.ae_title, self.settings.host, self.settings.port)

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
