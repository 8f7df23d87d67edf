"""A DICOM node that receives X-rays, runs AI inference on them and sends the results back to the PACS."""

__version__ = "0.1.0"
