"""The one train/held-out split that training, profiling and benchmarking share."""

from __future__ import annotations

import pytest

from evict.corpus import corpus_split, heldout_files


def test_split_is_a_partition_with_every_nth_file_held_out(tmp_path):
    for i in range(45):
        (tmp_path / f"m{i:02d}.py").write_text(f"x = {i}\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "m00.py").write_text("cached\n")
    train, held = corpus_split(20, root=tmp_path)
    assert [p.name for p in held] == ["m19.py", "m39.py"]
    assert len(train) == 43 and not set(train) & set(held)
    assert heldout_files(20, root=tmp_path) == held


def test_bad_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="holdout_every"):
        corpus_split(1, root=tmp_path)
    with pytest.raises(RuntimeError, match="standard library"):
        corpus_split(20, root=tmp_path / "empty")
