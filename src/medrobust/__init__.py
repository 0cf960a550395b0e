"""medrobust: medical-imaging deep learning with pluggable adversarial-robustness callbacks."""

__version__ = "0.1.0"
