"""pkd-offline: knowledge distillation of object detectors against stored teacher FPN features."""

__version__ = "0.1.0"
