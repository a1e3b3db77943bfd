"""mura-ray: abnormality screening of musculoskeletal radiographs on Ray."""

__version__ = "0.2.0"
