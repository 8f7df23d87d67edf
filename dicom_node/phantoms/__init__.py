"""Synthetic hand and foot radiographs with known ground truth, for training, evaluation and tests.

These phantoms are drawings, not patients: models trained on them are demo models, not for clinical use.
"""

from dicom_node.phantoms.generator import generate_phantoms
from inference.training.labels import LABEL_COLUMNS, PhantomLabel, read_labels

__all__ = ["LABEL_COLUMNS", "PhantomLabel", "generate_phantoms", "read_labels"]
