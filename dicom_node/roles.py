"""What one ``dicom-node serve`` process runs (``--role``); :mod:`dicom_node.node` says what each role is."""

from typing import Literal

Role = Literal["all", "ingest", "worker", "web"]
ROLES: tuple[Role, ...] = ("all", "ingest", "worker", "web")
