import os

import pytest

from kapify.files import write_atomically, write_text_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    write_text_atomically(path, "old")

    def torn(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write the results .*out\.json.*No space left.*unchanged: retry"):
        write_atomically(path, torn, "results", hint=": retry")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "out.txt"
    write_text_atomically(path, "first")
    write_text_atomically(path, "second")
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["out.txt"]
