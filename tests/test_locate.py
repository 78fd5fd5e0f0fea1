"""Where the defect is: box reading, the localisation metrics, the classical method and Grad-CAM."""

from __future__ import annotations

import shutil
import tarfile
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from neu_model.core.config import CLASSES
from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError
from neu_model.data.dataset import load_images
from neu_model.data.neu_det import read_boxes
from neu_model.localisation.cam import class_maps
from neu_model.localisation.geometry import (
    boxes_by_file,
    greedy_matches,
    iou_matrix,
    points_inside,
    prefix_matches,
)
from neu_model.localisation.methods import (
    Located,
    LocateParams,
    localisation_figures,
    localisation_report,
    locate,
    params_from_dict,
    score_image,
)
from neu_model.localisation.regions import RegionParams, classical_heat, heat_regions
from neu_model.model.networks import build_model

from conftest import FIXTURE_IMAGES

FIXTURES = ROOT / "tests" / "fixtures"
BOXES_CSV = FIXTURES / "boxes.csv"
VOC_DIR = FIXTURES / "NEU-DET-annotations"  # crazing_1, inclusion_2, rolled-in_scale_3
VOC_FILES = {"Cr_1.bmp", "In_2.bmp", "RS_3.bmp"}


# --- metric definitions on hand-made boxes -------------------------------------------------

def test_iou_of_identical_disjoint_and_half_shifted_boxes():
    a = [[0, 0, 10, 10]]
    assert iou_matrix(a, [[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10]]).tolist() == [[1.0, 0.0, 50 / 150]]
    assert iou_matrix([], a).shape == (0, 1)


def test_greedy_matching_is_one_to_one_and_takes_regions_in_order():
    boxes = [[0, 0, 10, 10], [100, 100, 110, 110]]
    # Two regions on the same box: only one counts; the third region misses everything.
    assert greedy_matches([[0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 60, 60]], boxes) == 1
    # The first region takes the box it overlaps most, leaving the other box to the second region.
    regions = [[0, 0, 10, 10, 0.9], [100, 100, 110, 112, 0.5]]
    assert greedy_matches(regions, boxes) == 2
    assert greedy_matches(regions, boxes, min_iou=0.9) == 1  # 100/120 < 0.9
    assert greedy_matches([], boxes) == 0


def test_prefix_matches_count_every_best_n_rule_in_one_pass():
    rng = np.random.default_rng(1)
    corners = rng.uniform(0, 150, (12, 2))
    regions = np.hstack([corners, corners + rng.uniform(10, 50, (12, 2))])
    boxes = regions[::3] + rng.uniform(-4, 4, (4, 4))
    counts = prefix_matches(regions, boxes)
    assert counts.tolist() == [greedy_matches(regions[:n], boxes) for n in range(len(regions) + 1)]
    assert counts[-1] >= 1 and (np.diff(counts) >= 0).all()


def test_pointing_tolerance_is_fifteen_pixels():
    box = [[50, 50, 100, 100]]
    assert points_inside(75, 75, box, 0)
    assert not points_inside(110, 75, box, 0) and points_inside(110, 75, box)
    assert not points_inside(116, 75, box)


def test_score_and_summary_of_hand_made_regions():
    boxes = np.array([[0, 0, 50, 50], [100, 100, 150, 150]], float)
    heat = np.zeros((200, 200), np.float32)
    heat[120, 130] = 1.0
    hit = Located(np.array([[0, 0, 50, 48, 2.0], [160, 160, 190, 190, 1.0]]), heat, "In")
    miss = Located(np.array([[60, 0, 99, 40, 1.0]]), heat, "In")
    rows = pd.DataFrame([score_image(hit, boxes), score_image(miss, boxes)])
    assert rows["hit"].tolist() == [True, False]
    assert rows["point"].tolist() == [True, False]  # centres (25, 24) and (79.5, 20): 29.5 px right of a box
    summary = localisation_figures(rows)
    assert summary["box_accuracy"] == 0.5
    assert summary["recall"] == round(1 / 4, 4) and summary["precision"] == round(1 / 3, 4)
    assert summary["pointing_max"] == 1.0  # the heat's maximum (130.5, 120.5) lies in the second box


# --- the classical method ------------------------------------------------------------------

def _flat_with_blob(dark: bool, gradient: float = 0.0) -> tuple[np.ndarray, list[float]]:
    rng = np.random.default_rng(0)
    image = 128 + rng.normal(0, 4, (200, 200)) + gradient * np.linspace(-1, 1, 200)[None, :]
    image[120:160, 40:70] += -45 if dark else 45
    return np.clip(image, 0, 255).astype(np.uint8), [40, 120, 70, 160]


@pytest.mark.parametrize("gradient", [0.0, 60.0])
def test_classical_finds_a_dark_blob_on_a_flat_or_unevenly_lit_image(gradient):
    image, blob = _flat_with_blob(dark=True, gradient=gradient)
    params = RegionParams(polarity="dark", k=1.5, spread=(3, 3), threshold=0.3)
    regions = heat_regions(classical_heat(image, params), params)
    assert iou_matrix(regions[:1], [blob])[0, 0] >= 0.5


def test_polarity_decides_whether_a_bright_blob_is_evidence():
    image, blob = _flat_with_blob(dark=False)
    bright = RegionParams(polarity="bright", k=1.5, spread=(3, 3), threshold=0.3)
    assert iou_matrix(heat_regions(classical_heat(image, bright), bright)[:1], [blob])[0, 0] >= 0.5
    dark = RegionParams(polarity="dark", k=1.5, spread=(3, 3), threshold=0.3)
    assert iou_matrix(heat_regions(classical_heat(image, dark), dark)[:1], [blob])[0, 0] < 0.5


def test_regions_of_an_image_without_evidence_are_the_whole_image():
    params = RegionParams()
    assert heat_regions(np.zeros((200, 200)), params).tolist() == [[0, 0, 200, 200, 0.0]]


# --- Grad-CAM ------------------------------------------------------------------------------

class BrightSpotNet(nn.Module):
    """One 3x3 averaging convolution, global average pool, a linear head: class 0 means bright."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(1, 2, 3, padding=1)
        with torch.no_grad():
            conv.weight.fill_(1 / 9)
            conv.weight[1].mul_(-1)
            conv.bias.zero_()
        self.features = nn.Sequential(nn.Sequential(conv, nn.ReLU()))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, len(CLASSES)))
        with torch.no_grad():
            self.head[2].weight.zero_()
            self.head[2].weight[0, 0] = 1.0
            self.head[2].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_gradcam_peaks_on_the_feature_the_class_responds_to():
    images = torch.zeros(2, 1, 200, 200, dtype=torch.uint8)
    images[0, 0, 30:50, 140:160] = 255
    images[1, 0, 150:170, 20:40] = 255
    maps, probs = class_maps(BrightSpotNet(), images, stage=0, targets=torch.tensor([0, 0]))
    assert maps.shape == (2, 200, 200) and probs.shape == (2, len(CLASSES))
    for cam, (row, col) in zip(maps, [(40, 150), (160, 30)], strict=True):
        peak_row, peak_col = np.unravel_index(int(cam.argmax()), cam.shape)
        assert abs(peak_row - row) <= 10 and abs(peak_col - col) <= 10
        assert float(cam.max()) == pytest.approx(1.0) and float(cam[0, 0]) == 0.0


@pytest.mark.parametrize("kind", ["gradcam", "layercam"])
def test_gradcam_of_an_untrained_defectnet_is_finite_and_not_flat(kind):
    torch.manual_seed(0)
    model = build_model("defectnet").eval()
    images = load_images(sorted(FIXTURE_IMAGES.glob("*_1.bmp")))
    for stage in (1, 2, 3):
        maps, _ = class_maps(model, images, stage=stage, kind=kind)
        assert maps.shape == (len(images), 200, 200)
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
        spread, peak = maps.flatten(1).std(1), maps.flatten(1).amax(1)
        # A map is all zero only where the class has no positive evidence at all (Grad-CAM's ReLU).
        assert ((spread > 0) | (peak == 0)).all() and (spread > 0).sum() >= len(images) // 2
    assert not model.training


# --- reading boxes ---------------------------------------------------------------------------

def test_boxes_from_the_csv_use_neu_cls_names_and_class_codes():
    table = read_boxes(BOXES_CSV)
    raw = pd.read_csv(BOXES_CSV)
    assert len(table) == len(raw)
    assert set(table["file"]) == set(raw["file"]) <= {p.name for p in FIXTURE_IMAGES.glob("*.bmp")}
    assert set(table["box_class"]) <= set(CLASSES)
    assert (table["label"] == table["file"].str.split("_").str[0]).all()
    edges = boxes_by_file(table)["Cr_1.bmp"]
    assert edges.tolist() == [[1.0, 1.0, 193.0, 194.0]]  # VOC 2,2,193,194 as 0-based pixel edges


def _as_tuples(table: pd.DataFrame) -> list[tuple]:
    cols = ["file", "label", "box_class", "xmin", "ymin", "xmax", "ymax"]
    return sorted(map(tuple, table[cols].itertuples(index=False)))


def test_voc_folder_zip_and_tar_give_the_csv_rows(tmp_path):
    expected = _as_tuples(read_boxes(BOXES_CSV).query("file in @VOC_FILES"))
    assert _as_tuples(read_boxes(VOC_DIR)) == expected
    with zipfile.ZipFile(tmp_path / "ann.zip", "w") as zf:
        for xml in VOC_DIR.glob("*.xml"):
            zf.write(xml, f"NEU-DET/annotations/{xml.name}")
    assert _as_tuples(read_boxes(tmp_path / "ann.zip")) == expected
    with tarfile.open(tmp_path / "ann.tar.gz", "w:gz") as tf:
        tf.add(VOC_DIR, "annotations")
    assert _as_tuples(read_boxes(tmp_path / "ann.tar.gz")) == expected
    # A repository's own XML and CSV files beside the annotations are no annotations: skipped.
    shutil.copytree(VOC_DIR, tmp_path / "repo" / "annotations")
    (tmp_path / "repo" / "pom.xml").write_text("<project/>")
    (tmp_path / "repo" / "results.csv").write_text("epoch,loss\n1,0.5\n")
    assert _as_tuples(read_boxes(tmp_path / "repo")) == expected


@pytest.mark.parametrize("case", ["missing", "no_columns", "bad_xml", "bad_class", "empty_box", "unsafe_zip"])
def test_bad_box_sources_fail_in_one_line_naming_the_file(tmp_path, case):
    if case == "missing":
        source = tmp_path / "nowhere.csv"
    elif case == "no_columns":
        source = tmp_path / "b.csv"
        source.write_text("file,x\nCr_1.bmp,3\n")
    elif case == "bad_xml":
        source = tmp_path / "ann"
        shutil.copytree(VOC_DIR, source)
        (source / "inclusion_2.xml").write_text("<annotation><object>")
    elif case == "bad_class":
        source = tmp_path / "b.csv"
        source.write_text("file,box_class,xmin,ymin,xmax,ymax\nCr_1.bmp,rust,1,1,5,5\n")
    elif case == "empty_box":
        source = tmp_path / "b.csv"
        source.write_text("file,box_class,xmin,ymin,xmax,ymax\nCr_1.bmp,crazing,9,1,5,5\n")
    else:
        source = tmp_path / "ann.zip"
        with zipfile.ZipFile(source, "w") as zf:
            zf.writestr("../escape.xml", "<annotation/>")
    with pytest.raises(StageError) as err:
        read_boxes(source)
    message = str(err.value)
    assert "\n" not in message and source.name in message


# --- the report ----------------------------------------------------------------------------

@pytest.mark.slow
def test_report_of_fixture_images_counts_every_annotated_image_and_agrees_with_the_boxes():
    table = read_boxes(BOXES_CSV)
    files = sorted(p.name for p in FIXTURE_IMAGES.glob("*.bmp"))
    images = load_images([FIXTURE_IMAGES / f for f in files])
    labels = [f.split("_")[0] for f in files]
    torch.manual_seed(0)
    report = localisation_report(build_model("defectnet").eval(), images, labels, files, table)
    annotated = set(table["file"])
    assert report["images"] == len(annotated & set(files))
    assert set(report["methods"]) == {"whole_image", "classical", "gradcam", "combined"}
    whole = report["methods"]["whole_image"]["overall"]
    # A box's IoU with the whole image is its area share: computed here from the CSV alone.
    own = table[table["box_class"] == table["label"]]
    share = (own.xmax - own.xmin + 1) * (own.ymax - own.ymin + 1) / 40000
    assert whole["box_accuracy"] == round(own[share >= 0.5]["file"].nunique() / report["images"], 4)
    for method in report["methods"].values():
        assert sum(c["images"] for c in method["classes"].values()) == method["overall"]["images"]
        assert 0 <= method["overall"]["recall"] <= 1 and 0 <= method["overall"]["precision"] <= 1


def test_locate_without_a_model_runs_the_classical_method_only():
    images = load_images([FIXTURE_IMAGES / "In_1.bmp"])
    located = locate(images, LocateParams(method="classical"))
    assert located[0].regions.shape[1] == 5 and located[0].heat.shape == (200, 200)
    with pytest.raises(ValueError, match="needs a model"):
        locate(images, LocateParams(method="combined"))


def test_params_from_a_locate_section_inherit_the_default_and_refuse_unknown_keys():
    params = params_from_dict({"method": "classical", "k": 2.0, "classes": {"Sc": {"polarity": "bright"}}})
    assert params.for_class("Sc").polarity == "bright" and params.for_class("Sc").k == 2.0
    assert params.for_class("Cr") == params.default
    with pytest.raises(ValueError, match="unknown key locate.classes.Cr.sigma"):
        params_from_dict({"classes": {"Cr": {"sigma": 3}}})
    with pytest.raises(ValueError, match="method"):
        params_from_dict({"method": "yolo"})


# --- figures -------------------------------------------------------------------------------

def test_gallery_shows_every_misclassified_image_then_some_of_each_class():
    from neu_model.localisation.gallery import gallery_indices

    labels = [0, 0, 0, 1, 1, 2]
    predicted = [0, 1, 0, 1, 1, 2]
    assert gallery_indices(labels, predicted, per_class=1) == [1, 0, 3, 5]
    assert gallery_indices(labels, predicted, per_class=2) == [1, 0, 2, 3, 4, 5]


def test_locate_gallery_writes_a_png_of_the_chosen_images(tmp_path):
    from neu_model.localisation.gallery import locate_gallery

    files = ["Cr_1.bmp", "In_2.bmp", "RS_3.bmp"]
    images = load_images([FIXTURE_IMAGES / f for f in files])
    torch.manual_seed(0)
    shown = locate_gallery(build_model("defectnet").eval(), images, torch.tensor([0, 1, 4]), files,
                           read_boxes(BOXES_CSV), tmp_path / "gallery.png", per_class=1)
    assert set(shown) <= set(files) and len(shown) >= 1
    assert (tmp_path / "gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
