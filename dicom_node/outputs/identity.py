"""Who made an output: the node as equipment (PS3.3 C.7.5.1 General Equipment) and the model that computed
the result (Contributing Equipment, PS3.3 C.12.1.1.5; IHE AI Results 6.5.3.1)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import generate_uid

import dicom_node
from dicom_node.outputs.uids import InstallationUids
from inference.model_card import DEMO_DISCLAIMER

MANUFACTURER = "dicom-node project"
MANUFACTURER_MODEL_NAME = "dicom-node"


@dataclass(frozen=True)
class NodeIdentity:
    """The node as the equipment that wrote an object, and the UIDs of its installation."""

    ae_title: str
    uids: InstallationUids
    manufacturer: str = MANUFACTURER
    model_name: str = MANUFACTURER_MODEL_NAME
    software_version: str = dicom_node.__version__

    @property
    def device_uid(self) -> str:
        """A UID of this node, the same on every run and different in every installation."""
        return self.uids.device_uid


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The model behind a result, as its card and weights name it."""

    name: str
    version: str
    weights_digest: str
    demo: bool

    @property
    def uid(self) -> str:
        """A UID of these weights, the same wherever they run: derived from their digest."""
        return generate_uid(entropy_srcs=[self.name, self.version, self.weights_digest])

    @property
    def disclaimer(self) -> str | None:
        """What every output of a demo model must say about it; None for a real model."""
        return DEMO_DISCLAIMER if self.demo else None
