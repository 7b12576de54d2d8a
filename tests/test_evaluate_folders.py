"""evaluate.py on a folder of the user's images, and the shared chunking (sharded_rows) under the
inputs users give: any dtype, a chunk larger than the job, the progress bar's count."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from genscale import evaluate
from genscale.metrics import sharded
from genscale.metrics.judge import digits_split
from genscale.metrics.sharded import sharded_rows
from genscale.run_files import to_uint8
from tests.test_evaluate_support import ThreadGroup, upsample


@pytest.fixture(scope="module")
def cache(eval_cache):
    return eval_cache  # tests/conftest.py: one GENSCALE_CACHE shared with the other metric tests


def grey_palette_folder(folder, images: np.ndarray) -> None:
    """The images as palette PNGs with a grey palette (how many tools save greyscale)."""
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0], "L").convert("P").save(folder / f"{i:03d}.png")


def test_classes_of_a_folder_equal_those_of_the_same_images_as_an_array(cache, tmp_path, capsys):
    """--metric classes on a folder ended in a TypeError traceback; a grey palette folder was also
    taken for colour (so without --reference it was refused)."""
    _, _, test_x, _ = digits_split()
    images = to_uint8(upsample(test_x[:24], 16))  # uint8 N x 16 x 16 x 1, digits no one here drew
    grey_palette_folder(tmp_path / "folder", images)
    np.savez(tmp_path / "s.npz", images)
    assert evaluate.main(["--samples", str(tmp_path / "folder"), "--metric", "classes",
                          "--json", str(tmp_path / "folder.json")]) == 0
    assert evaluate.main(["--samples", str(tmp_path / "s.npz"), "--metric", "classes",
                          "--json", str(tmp_path / "array.json")]) == 0
    import json

    folder, array = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("folder", "array"))
    assert folder["histogram"] == array["histogram"] and folder["num"] == array["num"] == 24
    assert sum(folder["histogram"]) == 24
    assert evaluate.main(["--samples", str(tmp_path / "folder"), "--metric", "classes", "--num", "5",
                          "--json", str(tmp_path / "five.json")]) == 0
    assert json.loads((tmp_path / "five.json").read_text())["num"] == 5


def test_accuracy_of_a_folder_asks_for_labels(tmp_path, capsys):
    _, _, test_x, _ = digits_split()
    grey_palette_folder(tmp_path / "folder", to_uint8(upsample(test_x[:4], 16)))
    assert evaluate.main(["--samples", str(tmp_path / "folder"), "--metric", "accuracy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give an .npz with its labels (arr_1), not a folder of images" in err[0]


@pytest.mark.parametrize("seed", ["-5", str(2**70)])
def test_seeds_outside_64_bits_are_refused(tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as exit_:
        evaluate.parse_args(["--samples", str(tmp_path / "s.npz"), "--seed", seed])
    assert exit_.value.code == 2 and "--seed must be between 0 and 2**63 - 1" in capsys.readouterr().err


def test_rows_of_any_dtype_and_a_chunk_larger_than_the_job():
    """uint8 rows (sample.py's images) gather like float64 ones; a chunk of 10**12 rows was an
    allocation of 10**12 rows (a traceback) and is the one chunk [0, num)."""
    def compute(k, start, stop):
        return (torch.arange(start, stop)[:, None] * 3 + torch.arange(5)) % 251

    single = sharded_rows(23, 4, 5, compute, dtype=torch.uint8)
    expected = (np.arange(23)[:, None] * 3 + np.arange(5)) % 251
    assert single.dtype == np.uint8 and np.array_equal(single, expected)
    for result in ThreadGroup(3).run(lambda acc: sharded_rows(23, 4, 5, compute, acc, dtype=torch.uint8)):
        assert np.array_equal(result, expected)
    assert np.array_equal(sharded_rows(23, 10**12, 5, compute, dtype=torch.uint8), expected)


def test_the_bar_counts_each_item_once(monkeypatch):
    """Rank 0's bar advanced by world x its chunk, so 100 items on 2 ranks showed 200 (and 250
    items in chunks of 40 on 2 ranks showed 260)."""
    counted: dict[int, int] = {}

    class Bar:
        def __init__(self, total, disable, **_):
            self.total, self.disable, self.n = total, disable, 0

        def update(self, n):
            self.n += n

        def close(self):
            if not self.disable:
                counted[self.total] = self.n

    monkeypatch.setattr(sharded, "tqdm", Bar)

    def compute(k, start, stop):
        return torch.zeros(stop - start, 1)

    for world, num, chunk in [(2, 100, 100), (2, 250, 40), (3, 250, 40), (1, 7, 3)]:
        counted.clear()
        ThreadGroup(world).run(lambda acc: sharded_rows(num, chunk, 1, compute, acc, desc="x")) if world > 1 \
            else sharded_rows(num, chunk, 1, compute, None, desc="x")
        assert counted == {num: num}, (world, num, chunk)
