"""Pure machine learning: pixels and metadata in, predictions and heatmaps out.

Never imports ``dicom_node`` or ``web``.
"""
