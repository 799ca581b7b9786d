"""yt8m: YouTube-8M video classification and temporal concept localization in PyTorch."""

__version__ = "0.1.0"
