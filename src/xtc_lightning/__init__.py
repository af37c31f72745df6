"""xtc-lightning: XTC extreme compression of BERT-style encoders on Lightning + Hydra."""

__version__ = "0.1.0"
