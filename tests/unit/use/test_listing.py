"""The inputs' listing held compactly: the streaming walk keeps the order of sorting by path parts,
a predict line of files and folders reads as one sequence, and the submission id check finds the
first repeated id without holding the ids."""

from __future__ import annotations

import os
import pickle

import pytest

from disttrain.data.folder import DataError
from disttrain.data.paths import PathTable
from disttrain.use.inputs import Listing, list_inputs, list_labelled
from disttrain.use.predict import check_ids


def _touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_walk_gives_the_order_of_sorting_by_path_parts_with_files_and_folders_interleaved(tmp_path):
    names = ["a/z/3.png", "a/z.png", "a/y/1.png", "a-b.png", "a.png", "a0/2.png", "B/1.png", "b/1.png", "é/1.png",
             "a/z/sub/4.png", "a/z0.png", "10.png", "9/1.png", "x/.h.png", ".h/1.png"]
    for name in names:
        _touch(tmp_path / "in" / name)
    expected = sorted((tuple(n.split("/")) for n in names if not any(p.startswith(".") for p in n.split("/"))))
    found = list_inputs([str(tmp_path / "in")])
    assert isinstance(found.paths, PathTable) and found.paths.root == str(tmp_path / "in")
    assert [os.path.relpath(p, tmp_path / "in") for p in found.paths] == [os.path.join(*parts) for parts in expected]
    # what the main process sends each rank: two arrays, not one object per file
    assert pickle.loads(pickle.dumps(found.paths)) == found.paths


def test_files_and_folders_on_one_line_read_as_one_sequence_in_the_order_given(tmp_path):
    one, two = _touch(tmp_path / "one.data"), _touch(tmp_path / "two.data")
    for name in ("b/2.png", "a/1.png"):
        _touch(tmp_path / "in" / name)
    found = list_inputs([str(one), str(tmp_path / "in"), str(two), str(one)])
    expected = [str(one), str(tmp_path / "in/a/1.png"), str(tmp_path / "in/b/2.png"), str(two), str(one)]
    assert isinstance(found.paths, Listing) and list(found.paths) == expected and len(found.paths) == 5
    assert [found.paths[i] for i in range(-5, 5)] == expected * 2 and found.paths[1:4] == expected[1:4]
    assert found.paths == expected and pickle.loads(pickle.dumps(found.paths)) == expected
    with pytest.raises(IndexError):
        found.paths[5]


def test_a_labelled_folder_has_its_labels_in_the_walks_order(tmp_path):
    for name in ("b/x/2.png", "b/1.png", "a/9.png", "a.png", "notes.txt"):
        _touch(tmp_path / name)
    listing = list_labelled(tmp_path, ["b", "a"], "model.pt")
    assert [os.path.relpath(p, tmp_path) for p in listing.paths] == ["a/9.png", "b/1.png", "b/x/2.png"]
    assert listing.labels == [1, 0, 0] and listing.left_out == 1


def test_the_first_repeated_id_is_named_with_the_file_that_had_it_first(tmp_path):
    paths = PathTable.from_names(str(tmp_path), ["a/1.png", "a/2.png", "b/3.png", "b/2.jpg", "c/1.png"])
    with pytest.raises(DataError) as err:
        check_ids(paths, "submission")
    assert str(err.value).startswith(f"{tmp_path}/a/2.png and {tmp_path}/b/2.jpg: the same id '2'")
    check_ids(PathTable.from_names(str(tmp_path), [f"{i}.png" for i in range(1000)]), "tags")  # none repeated



def test_a_listing_in_shared_memory_reads_as_the_table_it_was_made_from(tmp_path):
    from multiprocessing.reduction import ForkingPickler

    from disttrain.data.paths import in_shared_memory

    table = PathTable.from_names(str(tmp_path), ["a/1.png", "b/é.png", "c.png"])
    shared = in_shared_memory(table)
    assert shared == table and list(shared) == list(table) and shared[-1] == table[2] and shared.share_memory() is shared
    assert all(t.is_shared() for t in shared.tensors) and pickle.loads(pickle.dumps(shared)) == table
    # what a worker started from the fork server receives: handles to the same memory, not a copy
    received = pickle.loads(ForkingPickler.dumps(shared))
    received.blob[0] = ord("z")
    assert shared[0] == str(tmp_path / "z/1.png") and table[0] == str(tmp_path / "a/1.png")
    assert in_shared_memory(list(table)) == list(table)  # a list stays as it is
