"""Dice, NSD and HD95 against values computed by hand."""

import math

import numpy as np
import pytest

from nnunetv2_llm.evaluation.metrics.per_case import binary_metrics, case_metrics, image_diagonal_mm


def cube(shape, start, size, label=1):
    a = np.zeros(shape, dtype=np.uint8)
    a[tuple(slice(s, s + size) for s in start)] = label
    return a


# A 4x4x4 cube shifted by one voxel along axis 0. Its boundary has 56 voxels (64 minus the 2x2x2
# core). From either cube to the other: 36 boundary voxels lie on the other boundary (distance 0),
# the 4 core voxels of the overlapping end face are one in-plane voxel from the other boundary,
# and the 16 voxels of the outer end face are one voxel along axis 0 away.
REF = cube((10, 10, 10), (2, 2, 2), 4)
SHIFTED = cube((10, 10, 10), (3, 2, 2), 4)


def test_identical_masks():
    m = binary_metrics(REF.astype(bool), REF.astype(bool), (1.0, 1.0, 1.0), 1.0)
    assert m == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0, "ref_empty": False, "pred_empty": False}


def test_shifted_cube_isotropic():
    (m,) = case_metrics(SHIFTED, REF, (1.0, 1.0, 1.0), [1], nsd_tolerance_mm=1.0)
    assert m["dice"] == pytest.approx(2 * 48 / 128)  # overlap 3x4x4
    assert m["hd95"] == pytest.approx(1.0)
    assert m["nsd"] == pytest.approx(1.0)  # every distance is 0 or 1 mm


def test_shifted_cube_anisotropic_spacing():
    # spacing 3 mm along the shift axis: the 16 end-face distances become 3 mm, the 4 core ones stay 1 mm.
    (m,) = case_metrics(SHIFTED, REF, (3.0, 1.0, 1.0), [1], nsd_tolerance_mm=1.0, nsd_method="boundary")
    assert m["dice"] == pytest.approx(0.75)
    assert m["hd95"] == pytest.approx(3.0)  # 95th percentile of 36x0, 4x1, 16x3
    assert m["nsd"] == pytest.approx((36 + 4) / 56, abs=1e-6)
    (m,) = case_metrics(SHIFTED, REF, (3.0, 1.0, 1.0), [1], nsd_tolerance_mm=0.5, nsd_method="boundary")
    assert m["nsd"] == pytest.approx(36 / 56, abs=1e-6)
    # the same arrays with the spacing along another axis: the shift axis is now 1 mm.
    (m,) = case_metrics(SHIFTED, REF, (1.0, 1.0, 3.0), [1], nsd_tolerance_mm=1.0)
    assert m["hd95"] == pytest.approx(1.0)


def shifted_cube_surface(sz: float, sxy: float) -> tuple[float, float, float]:
    """Surface-element NSD (Nikolov et al.) of ``REF`` and ``SHIFTED`` by hand, spacing (sz, sxy, sxy) mm with
    sxy < sz: (total area of one surface, its area on the other surface, area of a z-face point).

    The surface points are the voxel corners on the box [2, 6]^3 (corner indices, axes z, y, x); each carries the
    area of its marching-cubes element: face points the face's pixel (z faces sxy x sxy, side faces sz x sxy), edge
    points a strip through the edge midpoints (along z: sz x |(sxy/2, sxy/2)|; along y or x: sxy x |(sz/2, sxy/2)|),
    corner points the triangle on the three half-edges (sz/2, sxy/2, sxy/2)."""
    face_z, face_side = sxy * sxy, sz * sxy
    edge_z, edge_xy = sz * math.hypot(sxy / 2, sxy / 2), sxy * math.hypot(sz / 2, sxy / 2)
    corner = 0.5 * math.sqrt((sz / 2 * sxy / 2) ** 2 * 2 + (sxy / 2 * sxy / 2) ** 2)
    # 2 z faces of 3x3 points, 4 side faces of 3x3, 4 z edges of 3, 8 y/x edges of 3, 8 corners
    area = 18 * face_z + 36 * face_side + 12 * edge_z + 24 * edge_xy + 8 * corner
    # on the other cube's surface (distance 0): side faces, z edges, and the ring of the face inside the other cube
    on_other = 36 * face_side + 12 * edge_z + 12 * edge_xy + 4 * corner
    return area, on_other, face_z


AREA, ON_OTHER, FACE_Z = shifted_cube_surface(3.0, 1.0)


@pytest.mark.parametrize(("tolerance", "within"), [
    (0.5, ON_OTHER),
    (1.0, ON_OTHER + 8 * FACE_Z),  # + the 8 inner face points next to the ring (1 mm); the centre is 2 mm away
    (2.9, ON_OTHER + 9 * FACE_Z),  # the far face is 3 mm (one 3 mm slice) away
    (3.0, AREA),
])
def test_surface_nsd_weights_surface_elements_by_area(tolerance, within):
    # the shifted cube is the mirror image of the reference, so both directions give the same fraction
    (m,) = case_metrics(SHIFTED, REF, (3.0, 1.0, 1.0), [1], nsd_tolerance_mm=tolerance, nsd_method="surface")
    assert m["nsd"] == pytest.approx(within / AREA, abs=1e-6)


def test_surface_is_the_default_and_differs_from_boundary():
    (default,) = case_metrics(SHIFTED, REF, (3.0, 1.0, 1.0), [1], nsd_tolerance_mm=1.0)
    (boundary,) = case_metrics(SHIFTED, REF, (3.0, 1.0, 1.0), [1], nsd_tolerance_mm=1.0, nsd_method="boundary")
    assert default["nsd"] == pytest.approx((ON_OTHER + 8) / AREA, abs=1e-6)  # 0.839
    assert boundary["nsd"] == pytest.approx(40 / 56, abs=1e-6)  # 0.714
    with pytest.raises(ValueError, match="NSD method"):
        binary_metrics(SHIFTED > 0, REF > 0, (1.0, 1.0, 1.0), 1.0, nsd_method="voxels")


def test_per_label_tolerance_mapping():
    rows = case_metrics(SHIFTED, REF, (3.0, 1.0, 1.0), [1], nsd_tolerance_mm={1: 3.0})
    assert rows[0]["nsd"] == pytest.approx(1.0)


def test_disjoint_cubes_anisotropic():
    # 2x2x2 cubes (all voxels on the boundary) 5 voxels apart along axis 0 with 3 mm spacing:
    # per direction 4 distances of 4 slices (12 mm) and 4 of 5 slices (15 mm) -> HD95 15 mm.
    ref = cube((10, 4, 4), (1, 1, 1), 2)
    pred = cube((10, 4, 4), (6, 1, 1), 2)
    (m,) = case_metrics(pred, ref, (3.0, 1.0, 1.0), [1])
    assert m["dice"] == 0.0
    assert m["nsd"] == 0.0
    assert m["hd95"] == pytest.approx(15.0)


def test_empty_reference():
    empty = np.zeros_like(REF)
    (m,) = case_metrics(REF, empty, (3.0, 1.0, 1.0), [1])
    assert m == {"label": 1, "dice": 0.0, "nsd": 0.0, "hd95": pytest.approx(math.sqrt(30**2 + 10**2 + 10**2)),
                 "ref_empty": True, "pred_empty": False}


def test_empty_prediction():
    (m,) = case_metrics(np.zeros_like(REF), REF, (2.0, 0.5, 0.5), [1])
    assert (m["dice"], m["nsd"], m["ref_empty"], m["pred_empty"]) == (0.0, 0.0, False, True)
    assert m["hd95"] == pytest.approx(image_diagonal_mm((10, 10, 10), (2.0, 0.5, 0.5))) == pytest.approx(math.sqrt(450))


def test_both_empty_and_multilabel():
    ref = REF + cube((10, 10, 10), (7, 7, 7), 2, label=2)
    rows = case_metrics(ref, ref, (1.0, 1.0, 1.0), [1, 2, 3])
    assert [r["label"] for r in rows] == [1, 2, 3]
    assert all(r["dice"] == 1.0 and r["nsd"] == 1.0 and r["hd95"] == 0.0 for r in rows)
    assert (rows[2]["ref_empty"], rows[2]["pred_empty"]) == (True, True)
    assert not any(math.isnan(r[k]) for r in rows for k in ("dice", "nsd", "hd95"))


def test_2d_and_shape_mismatch():
    ref = np.zeros((6, 6), dtype=np.uint8)
    ref[1:5, 1:3] = 1
    pred = np.zeros_like(ref)
    pred[1:5, 2:4] = 1
    (m,) = case_metrics(pred, ref, (1.0, 2.0), [1])
    assert m["dice"] == pytest.approx(0.5)
    assert m["hd95"] == pytest.approx(2.0)  # shift of one column of 2 mm
    with pytest.raises(ValueError):
        case_metrics(pred, ref[:5], (1.0, 2.0), [1])


def test_single_slice_volume_is_measured_as_its_2d_image():
    """2D data stored as 1xHxW (nnU-Net's reader even adds a fake axis of spacing 999): the size-1 axis and its
    spacing are dropped, so surface distances and the empty-mask diagonal are those of the 2D image."""
    ref = np.zeros((12, 12), dtype=np.uint8)
    ref[2:8, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[4:10, 2:8] = 1
    spacing_2d = (0.5, 0.8)
    expected = binary_metrics(pred > 0, ref > 0, spacing_2d, 1.0)
    assert expected["nsd"] < 1 and expected["hd95"] > 0
    for fake_spacing in (999 * 0.8, 3.0):
        single_slice = binary_metrics(pred[None] > 0, ref[None] > 0, (fake_spacing, *spacing_2d), 1.0)
        assert single_slice == pytest.approx(expected)
    empty = binary_metrics(np.zeros((1, 12, 12), bool), ref[None] > 0, (999 * 0.8, *spacing_2d), 1.0)
    assert empty["hd95"] == pytest.approx(image_diagonal_mm((12, 12), spacing_2d))
