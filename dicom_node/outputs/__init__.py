"""The node's results as DICOM: Secondary Capture images with the heatmap burned in, and a TID 1500
structured report per source image, written for delivery to the PACS."""
