"""unet/weights.py's writers: every file adapterkit writes (adapters, U-Nets, checkpoints) goes through
`atomic_write`, so these properties hold for all of them."""
import os

import pytest
import torch

from adapterkit.unet.weights import atomic_write, read_weights, write_safetensors


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_users_umask(tmp_path, umask):
    """safetensors creates its file mode 0600; a shared adapter must be readable as the umask allows."""
    old = os.umask(umask)
    try:
        write_safetensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
        atomic_write([(tmp_path / "b.json", lambda p: p.write_text("{}"))])
    finally:
        os.umask(old)
    for name in ("a.safetensors", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert torch.equal(read_weights(tmp_path / "a.safetensors")[0]["a"], torch.zeros(2))


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.safetensors"
    write_safetensors({"a": torch.ones(2)}, target)

    def broken(path):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="space"):
        atomic_write([(target, broken)])
    assert torch.equal(read_weights(target)[0]["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
