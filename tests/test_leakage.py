"""Exact-duplicate detection, on generated arrays and on the real brain MRI file."""

from __future__ import annotations

import numpy as np

from dataset.leakage import find_duplicates, image_hashes
from tests.conftest import make_arrays, shared_file


def test_hash_is_per_pixels_and_shape():
    images, _ = make_arrays(4)
    images[3] = images[1]
    h = image_hashes(images, chunk=3)
    assert h[1] == h[3] and len(set(h)) == 3
    flat = images.reshape(4, 8, 24, 1)  # same bytes, other shape
    assert image_hashes(flat)[0] != h[0]


def test_within_across_and_conflicts():
    train, ytrain = make_arrays(10)
    test, ytest = make_arrays(6, seed=5)
    train[9] = train[0]  # within train, same label? labels 0 and 0
    ytrain[9] = ytrain[0]
    test[1] = train[2]  # leaked, same label
    ytest[1] = ytrain[2]
    test[2] = train[3]  # leaked with another label
    ytest[2] = (ytrain[3] + 1) % 3
    test[4] = test[1]  # within test and leaked again
    ytest[4] = ytest[1]
    r = find_duplicates({"train": train, "test": test}, {"train": ytrain, "test": ytest})
    assert r.within == {"train": 1, "test": 1}
    assert r.across == {"train->test": 3} and r.across_distinct == {"train->test": 2}
    assert r.leaked == {"test": 3} and r.leaked_indices == {"test": [1, 2, 4]}
    assert r.label_conflicts == 1
    assert r.worst[0].label_conflict  # conflicts are listed first
    assert not r.clean


def test_clean_data():
    images, labels = make_arrays(20)
    r = find_duplicates({"train": images}, {"train": labels})
    assert r.clean and r.worst == []


def test_real_brain_mri_cross_split_duplicates():
    d = np.load(shared_file("brain_tumor_mri_64.npz"))
    r = find_duplicates(
        {"train": d["train_images"], "test": d["test_images"]},
        {"train": d["train_labels"], "test": d["test_labels"]},
    )
    # The figures documented with the file: 216 test images (189 distinct) also in train.
    assert r.leaked["test"] == 216 and r.leaked_distinct["test"] == 189
    assert r.within == {"train": 207, "test": 30}
