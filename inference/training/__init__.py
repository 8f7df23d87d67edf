"""Training and evaluation of the node's models (MONAI DenseNet121), tracked in MLflow."""
