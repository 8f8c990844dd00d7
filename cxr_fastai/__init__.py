"""cxr_fastai: train, inspect and export a small chest X-ray classifier with fastai.

Importing the package does nothing but define names; heavy modules (torch, fastai) load on use.
"""
__version__ = "0.1.0"
