"""DIMSE status codes the node answers with (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.2: general failure, for errors of the node itself
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class EchoStatus(IntEnum):
    """C-ECHO response statuses (PS3.7 section 9.1.5.1.4)."""

    SUCCESS = 0x0000
