"""The node's viewer and HTTP API. It reads what the node recorded; it does not speak DICOM networking."""
