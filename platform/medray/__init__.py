"""medray: distributed training, evaluation and batch scoring of medical image classifiers on Ray."""
