"""The versions of the packages a model or a report depends on: one list, read in one place."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# What a model folder records, `mura-ray doctor` prints and a bug report needs.
PACKAGES = (
    "mura-ray",
    "ray",
    "torch",
    "torchvision",
    "numpy",
    "pyarrow",
    "deltalake",
    "scikit-learn",
    "pillow",
    "pydicom",
    "safetensors",
    "s3fs",
)


def version_of(name: str) -> str | None:
    """The installed version of ``name``, or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Name -> version of those of ``names`` that are installed."""
    return {name: v for name in names if (v := version_of(name)) is not None}


def version_line() -> str:
    """``mura-ray X (ray Y, torch Z, torchvision W)``, as ``mura-ray --version`` prints it."""
    v = {name: version_of(name) or "not installed" for name in ("mura-ray", "ray", "torch", "torchvision")}
    return f"mura-ray {v['mura-ray']} (ray {v['ray']}, torch {v['torch']}, torchvision {v['torchvision']})"
