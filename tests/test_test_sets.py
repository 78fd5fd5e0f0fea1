"""The gate's test sets: the public and plant figures, and the images two split rules both hold out."""

import json

import pandas as pd

from neu_model.core.config import SplitConfig
from neu_model.data.split import public_parts, split_frame
from neu_model.data.test_sets import fair_test_files, figures

from labels_support import CHECKSUMS, public_manifest

PROTOCOL = SplitConfig(test_fraction=0.3, val_fraction=0.1)


def rule(seed: int) -> str:
    return json.dumps({"seed": seed, "test_fraction": 0.3, "val_fraction": 0.1}, sort_keys=True)


def test_figures_per_origin_and_together():
    table = pd.DataFrame({"label": ["Cr", "In", "Pa", "Sc", "Sc"], "predicted": ["Cr", "In", "Pa", "Sc", "Cr"],
                          "origin": ["public", "public", "public", "plant", "plant"]})
    assert figures(table) == {"all": {"images": 5, "accuracy": 0.8}, "public": {"images": 3, "accuracy": 1.0},
                              "plant": {"images": 2, "accuracy": 0.5}}
    assert figures(table.drop(columns="origin").iloc[:3])["plant"] == {"images": 0, "accuracy": None}


def test_a_champion_of_another_seed_is_compared_on_the_images_test_under_both_rules():
    manifest = public_manifest()
    now = split_frame(manifest, PROTOCOL, 0, public_parts(CHECKSUMS, PROTOCOL, 0))
    then = split_frame(manifest, PROTOCOL, 1, public_parts(CHECKSUMS, PROTOCOL, 1)).set_index("file")["split"]
    read = []
    files = fair_test_files(now, lambda: read.append(1) or manifest, rule(0), rule(1), CHECKSUMS)
    assert 0 < len(files) < 540 and read == [1]
    assert all(then[f] == "test" for f in files)  # never an image the seed-1 model trained or validated on
    assert set(files) == set(now.loc[now["split"] == "test", "file"]) & set(then[then == "test"].index)
    # the same rule (or none recorded): the whole test part, and the manifest is not even read
    for earlier in (rule(0), None):
        assert fair_test_files(now, lambda: read.append(1) or manifest, rule(0), earlier, CHECKSUMS) == \
            sorted(now.loc[now["split"] == "test", "file"])
    assert read == [1]
