"""Image-file checks: whether a file nnU-Net would read is a complete, readable image.

SimpleITK reads some broken files without complaint (a half-truncated ``.nii.gz`` gives zeros for the missing
voxels), so NIfTI-1 files are checked byte by byte here before SimpleITK reads the header and the voxels.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from pathlib import Path

# The file endings of nnU-Net's image readers (SimpleITK, nibabel, tiff, 2-D natural images, blosc2).
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff", ".png", ".bmp", ".b2nd")
NIFTI1_HEADER_SIZE = 348  # sizeof_hdr of NIfTI-1; 540 is NIfTI-2's
NIFTI2_HEADER_SIZE = 540


def nifti_problem(path: Path) -> str | None:
    """Checks SimpleITK does not make for NIfTI-1 files: it reads a half-truncated .nii.gz without complaint
    (missing voxels become zeros), ignores sizeof_hdr and the magic, and turns a zero or NaN pixdim into spacing
    1.0. Here: the gzip stream must be complete, the header consistent, and the voxel data as long as it says.

    Returns:
        Why the file is broken, or None when it passes (also for NIfTI-2, left to SimpleITK).
    """
    try:
        header, total = _read_whole_file(path)
    except (EOFError, OSError, zlib.error) as e:
        return f"truncated or corrupt {'gzip stream' if path.name.endswith('.gz') else 'file'} ({e})"
    if len(header) < NIFTI1_HEADER_SIZE:
        return f"file too short for a NIfTI header ({len(header)} bytes)"
    endian = next((e for e in "<>" if struct.unpack(f"{e}i", header[:4])[0] == NIFTI1_HEADER_SIZE), None)
    if endian is None:
        if NIFTI2_HEADER_SIZE in (struct.unpack("<i", header[:4])[0], struct.unpack(">i", header[:4])[0]):
            return None
        return f"broken NIfTI header: sizeof_hdr is {struct.unpack('<i', header[:4])[0]}, not {NIFTI1_HEADER_SIZE}"
    return _nifti1_header_problem(header, endian, total)


def _read_whole_file(path: Path) -> tuple[bytes, int]:
    """The first 352 bytes (header and extension flag) and the total length, decompressed for ``.gz``; reading
    to the end is what finds a truncated gzip stream."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        header = f.read(352)
        total = len(header)
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return header, total


def _nifti1_header_problem(header: bytes, endian: str, total: int) -> str | None:
    """What is inconsistent in a NIfTI-1 header (magic, dim, pixdim), or voxel data shorter than it promises."""
    if header[344:348] not in (b"n+1\x00", b"ni1\x00"):
        return f"broken NIfTI header: magic {header[344:348]!r} is not 'n+1' or 'ni1'"
    dim = struct.unpack(f"{endian}8h", header[40:56])
    bitpix = struct.unpack(f"{endian}h", header[72:74])[0]
    pixdim = struct.unpack(f"{endian}8f", header[76:108])
    vox_offset = struct.unpack(f"{endian}f", header[108:112])[0]
    if not 1 <= dim[0] <= 7 or any(d < 1 for d in dim[1:dim[0] + 1]):
        return f"broken NIfTI header: dim {dim}"
    spatial = pixdim[1:min(dim[0], 3) + 1]
    if any(not math.isfinite(p) or p == 0 for p in spatial):
        return f"broken NIfTI header: voxel spacing (pixdim) {spatial} has zero or non-finite values"
    if header[344:348] == b"n+1\x00" and bitpix > 0 and math.isfinite(vox_offset):
        expected = int(vox_offset) + math.prod(dim[1:dim[0] + 1]) * bitpix // 8
        if total < expected:
            return f"truncated: {total} bytes, the header promises {expected}"
    return None


def check_image(path: Path) -> str | None:
    """Why ``path`` is not a readable image (None when it is): NIfTI files get the checks of ``nifti_problem``;
    then SimpleITK reads the header, the geometry is checked, and the voxels are read."""
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # e.g. "Analyze file is deprecated" on stderr
    if path.name.endswith((".nii", ".nii.gz")):
        problem = nifti_problem(path)
        if problem:
            return problem
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        return f"unreadable header ({_itk_reason(e)})"
    size, spacing = reader.GetSize(), reader.GetSpacing()
    if not size or any(s <= 0 for s in size):
        return f"empty image (size {size})"
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        return f"invalid voxel spacing {spacing} in the header"
    if any(not math.isfinite(v) for v in (*reader.GetOrigin(), *reader.GetDirection())):
        return "non-finite origin or direction in the header"
    try:
        reader.Execute()
    except RuntimeError as e:
        return f"header is fine but the voxel data cannot be read (truncated file?): {_itk_reason(e)}"
    return None


def _itk_reason(error: Exception) -> str:
    """ITK's exception text spans lines with file/line noise: keep its description."""
    text = " ".join(str(error).split())
    match = re.search(r"(?:Description|description):\s*(.*)", text)
    text = match.group(1) if match else text
    return text if len(text) <= 200 else text[:197] + "..."
