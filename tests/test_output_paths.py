"""Output names checked before the work (genscale/cli.py output_file / output_files): what a user
types by mistake is one sentence, before hours of sampling or evaluation, and nothing is left."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from genscale.cli import output_file, output_files
from genscale.errors import UserError


@pytest.mark.parametrize("out", ["", "dir/"])
def test_a_name_that_is_not_a_file_is_refused(tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--out must name a file"):  # "" was a ValueError traceback
        output_files(out)
    assert list(tmp_path.iterdir()) == []


def test_a_name_without_suffix_beside_a_folder_of_that_name(tmp_path):
    """README: a name without a suffix writes both files; a folder of that name stays untouched."""
    (tmp_path / "shots").mkdir()
    files = output_files(str(tmp_path / "shots"))
    assert files == {".png": tmp_path / "shots.png", ".npz": tmp_path / "shots.npz"}
    (tmp_path / "shots.png").mkdir()  # now the file to write is itself a folder
    with pytest.raises(UserError, match="is a folder; give a file name"):
        output_files(str(tmp_path / "shots"))


def test_a_name_too_long_for_the_file_system(tmp_path):
    with pytest.raises(UserError, match="cannot be written \\(File name too long\\)"):  # was an OSError traceback
        output_files(str(tmp_path / ("a" * 300)))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_new_file(tmp_path):
    """/proc looks writable to root (os.access says yes) but takes no new file: the write at the
    end of the work failed, and the work was lost."""
    if os.access("/proc", os.W_OK):
        with pytest.raises(UserError, match="--out /proc/x.png cannot be written: /proc takes no new file"):
            output_files("/proc/x.png")
    with pytest.raises(UserError, match="--json /proc/r.json cannot be written"):
        output_file("/proc/r.json", "--json")


def test_the_write_check_leaves_nothing_behind(tmp_path):
    files = output_files(str(tmp_path / "sub" / "out"))
    assert files == {".png": tmp_path / "sub" / "out.png", ".npz": tmp_path / "sub" / "out.npz"}
    assert list((tmp_path / "sub").iterdir()) == []  # the folder is made; no probe file is left


@pytest.mark.parametrize("json_out", ["", "newdir/"])
def test_evaluate_json_that_is_not_a_file(tmp_path, monkeypatch, capsys, json_out):
    from genscale import evaluate

    monkeypatch.chdir(tmp_path)
    samples = tmp_path / "s.npz"
    np.savez(samples, np.zeros((2, 8, 8, 1), np.uint8))
    # --json "" wrote no JSON without a word; "newdir/" wrote a file named newdir
    assert evaluate.main(["--samples", str(samples), "--json", json_out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--json must name a file" in err[0]
    assert not (tmp_path / "newdir").exists()
