"""GPULOAD_* flags: parsed once, validated loudly, keyword twins win."""

from __future__ import annotations

import pytest

from gpuload import config


def test_defaults_and_every_flag_parses():
    c = config.from_env({})
    assert (c.prefetch, c.prefault, c.backend, c.pin) == (True, "auto", "auto", True)
    assert c.chunk_bytes == 16 << 20 and c.staging_bytes == 256 << 20 and c.threads == 8
    c = config.from_env(
        {
            "GPULOAD_PREFETCH": "0",
            "GPULOAD_PREFAULT": "1",
            "GPULOAD_BACKEND": "posix",
            "GPULOAD_PIN": "0",
            "GPULOAD_THREADS": "3",
            "GPULOAD_STAGING_BYTES": "128MiB",
            "GPULOAD_CHUNK_BYTES": "8M",
            "GPULOAD_MIN_CHUNK_BYTES": "1048576",
            "GPULOAD_DEVICE_SCRATCH_BYTES": "1G",
            "GPULOAD_PROGRESS": "0",
        }
    )
    assert c == config.Config(
        prefetch=False,
        prefault=True,
        backend="posix",
        pin=False,
        threads=3,
        staging_bytes=128 << 20,
        chunk_bytes=8 << 20,
        min_chunk_bytes=1 << 20,
        device_scratch_bytes=1 << 30,
        progress=False,
    )


@pytest.mark.parametrize(
    "flag,value",
    [
        ("GPULOAD_PREFETCH", "maybe"),
        ("GPULOAD_PREFAULT", "2"),
        ("GPULOAD_BACKEND", "gds"),
        ("GPULOAD_THREADS", "0"),
        ("GPULOAD_THREADS", "1.5"),
        ("GPULOAD_THREADS", "-2"),
        ("GPULOAD_STAGING_BYTES", "0"),
        ("GPULOAD_CHUNK_BYTES", "64XB"),
        ("GPULOAD_PIN", ""),
        ("GPULOAD_TYPO", "1"),
    ],
)
def test_bad_values_fail_naming_flag_and_value(flag, value):
    with pytest.raises(ValueError) as e:
        config.from_env({flag: value})
    assert flag in str(e.value)


def test_keyword_twins_override_and_validate():
    base = config.from_env({"GPULOAD_THREADS": "4"})
    assert base.replace(threads=2, prefetch=None).threads == 2
    assert base.replace(prefetch=None).prefetch is True
    with pytest.raises(TypeError, match="unknown"):
        base.replace(thread=2)
    with pytest.raises(ValueError, match="threads"):
        base.replace(threads=0)


def test_override_context_and_reload(monkeypatch):
    monkeypatch.setenv("GPULOAD_THREADS", "5")
    assert config.reload().threads == 5
    with config.override(threads=1) as c:
        assert c.threads == 1 and config.get().threads == 1
    assert config.get().threads == 5
    monkeypatch.delenv("GPULOAD_THREADS")
    config.reload()


def test_every_flag_is_in_the_readme_table_and_the_module_table():
    """A flag nobody can find is a flag nobody can turn off."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = {
        line.split("|")[1].strip(" `")
        for line in readme.splitlines()
        if line.startswith("| `GPULOAD_")
    }
    assert set(config._FLAGS) == table
    assert all(flag in config.__doc__ for flag in config._FLAGS)


# issue 23: argument checks the README promises


def _tiny(tmp_path):
    from gpuload import synth

    return synth.write_model(tmp_path / "m", "tiny", num_files=1)


def test_zerocopy_without_pin_refused_on_the_cpu_path_too(tmp_path):
    import gpuload

    with pytest.raises(ValueError, match="zerocopy.*pin=0"):
        gpuload.load_sharded(_tiny(tmp_path), 0, 2, device="cpu", gather="zerocopy", pin=False)
    with pytest.raises(ValueError, match="zerocopy.*pin=0"):
        gpuload.Loader(device="cpu", gather="zerocopy", pin=False)


def test_min_chunk_above_chunk_refused_when_chosen(tmp_path, monkeypatch):
    import gpuload

    path = _tiny(tmp_path)
    with pytest.raises(ValueError, match="min_chunk_bytes=8192 exceeds chunk_bytes=4096"):
        gpuload.load_sharded(path, 0, 2, device="cpu", chunk_bytes=4096, min_chunk_bytes=8192)
    monkeypatch.setenv("GPULOAD_MIN_CHUNK_BYTES", "8192")
    config.reload()
    try:
        with pytest.raises(ValueError, match="exceeds chunk_bytes=4096"):
            gpuload.Loader(device="cpu", chunk_bytes=4096)
    finally:
        monkeypatch.delenv("GPULOAD_MIN_CHUNK_BYTES")
        config.reload()
    # the default floor (4 MiB) under a small cap is clamped, as before
    got = gpuload.load_sharded(path, 0, 2, device="cpu", chunk_bytes=4096)
    assert got
