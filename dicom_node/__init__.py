"""A DICOM node that receives X-rays, runs AI inference on them and sends the results back to the PACS."""

import os

__version__ = "0.1.0"

# MLflow (the tracker, MLflow model cards, training) reports usage to its vendor unless told not to; a node beside a
# PACS sends nothing out. Set in the environment, a site's own choice wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
