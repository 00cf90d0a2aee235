"""Fuzz, resume, interruption and worker-crash tests for `xr0_lib.data.dicom.preprocess_folder`."""
import io, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless, UID

from xr0_lib.data.dicom import robust_map, cli_preprocess, preprocess_folder, synthetic_dicom

os.environ.setdefault("XR0_PROGRESS", "0")
N = 64  # pixels per side of the test images; converted to a shortest side of 32


def _ramp(rng, dtype=np.uint16, lo=200, hi=3800):
    "A left-to-right ramp (plus noise): stored values rise to the right, so polarity is checkable."
    base = np.tile(np.linspace(lo, hi, N), (N, 1)) + rng.normal(0, 5, (N, N))
    return np.clip(base, np.iinfo(dtype).min, np.iinfo(dtype).max).round().astype(dtype)


def _good(i: int, rng) -> tuple[pydicom.Dataset, str]:
    "The i-th good file: cycles MONOCHROME1/2, window/no window, rescale, signed data, RLE and JPEG 2000."
    photometric = ("MONOCHROME1", "MONOCHROME2")[i % 2]
    kind = (i // 2) % 5
    if kind == 0: ds = synthetic_dicom(_ramp(rng), photometric, 12, window=(2000, 3000))
    elif kind == 1: ds = synthetic_dicom(_ramp(rng), photometric, 12)
    elif kind == 2: ds = synthetic_dicom(_ramp(rng), photometric, 12, window=(0, 3000), rescale=(1.0, -2000.0))
    elif kind == 3: ds = synthetic_dicom(_ramp(rng, np.int16, -1500, 1500), photometric, 16, window=(0, 2800))
    else: ds = synthetic_dicom(_ramp(rng, np.uint8, 10, 245), photometric, 8)
    if i % 7 == 3: ds.compress(RLELossless)
    if i % 7 == 5: ds.compress(JPEG2000Lossless)
    ds.PatientAge = f"{20 + i:03d}Y"
    return ds, photometric


def _raw_file(ds: pydicom.Dataset, ts: str, pixel_bytes: bytes | None = None) -> bytes:
    "Dataset bytes written as explicit little endian but labelled with transfer syntax `ts` (a mismatch on purpose)."
    if pixel_bytes is not None: ds.PixelData = pixel_bytes
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(ts)
    head = io.BytesIO(); write_file_meta_info(head, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + head.getvalue() + body.getvalue()


def _bad_files(rng, good_bytes: bytes) -> dict[str, bytes]:
    "200 malformed files, 40 of each kind: truncated, random bytes, wrong transfer syntax, empty pixels, non-DICOM."
    out = {}
    for i in range(40):   # truncated anywhere: preamble, meta, data set, or the middle of Pixel Data
        cut = int(rng.integers(0, len(good_bytes) - 1)) if i % 2 else int(rng.integers(len(good_bytes) - 8000, len(good_bytes) - 1))
        out[f"truncated/{i:02d}.dcm"] = good_bytes[:cut]
    for i in range(40):   # random bytes, half of them behind a valid 'DICM' marker
        junk = rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()
        out[f"random/{i:02d}" + (".dcm" if i % 3 else "")] = (b"\0" * 128 + b"DICM" + junk) if i % 2 else junk
    wrong = [JPEG2000Lossless, JPEGBaseline8Bit, RLELossless, JPEGLSLossless, "1.2.3.4.5.6"]
    for i in range(40):   # native pixels labelled compressed / unknown, or garbage compressed fragments
        ds = synthetic_dicom(_ramp(rng), "MONOCHROME2", 12)
        ts = wrong[i % len(wrong)]
        frag = None if i < 20 else encapsulate([rng.integers(0, 256, 600, dtype=np.uint8).tobytes()])
        out[f"wrong_ts/{i:02d}.dcm"] = _raw_file(ds, ts, frag)
    for i in range(40):   # zero-size pixel data, zero rows, no pixel data at all, colour, too little data
        ds = synthetic_dicom(_ramp(rng), "MONOCHROME2", 12)
        k = i % 5
        if k == 0: ds.PixelData = b""
        elif k == 1: ds.Rows = 0
        elif k == 2: del ds.PixelData
        elif k == 3: ds = _rgb(rng)
        else: ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        b = io.BytesIO(); ds.save_as(b, enforce_file_format=True); out[f"empty_pixels/{i:02d}.dcm"] = b.getvalue()
    png = io.BytesIO(); Image.fromarray(_ramp(rng, np.uint8, 0, 255)).save(png, format="PNG")
    kinds = [b"", b"patient,label\n1,0\n", png.getvalue(), b"PK\x03\x04" + bytes(100), "résumé ✓".encode()]
    for i in range(40):   # not DICOM at all
        out[f"not_dicom/{i:02d}" + [".txt", ".csv", ".png", ".zip", ".dcm"][i % 5]] = kinds[i % 5]
    assert len(out) == 200
    return out


def _rgb(rng) -> pydicom.Dataset:
    ds = pydicom.Dataset(); ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.set_pixel_data(rng.integers(0, 255, (N, N, 3), dtype=np.uint8), "RGB", 8)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"; ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def _write_good(root: Path, n: int, rng) -> dict[str, str]:
    photometric = {}
    for i in range(n):
        ds, pi = _good(i, rng)
        rel = f"good/p{i % 5}/{i:02d}" + (".dcm" if i % 4 else "")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(root / rel, enforce_file_format=True)
        photometric[rel] = pi
    return photometric


def test_fuzz_200_malformed_50_good(tmp_path):
    rng = np.random.default_rng(0)
    src, out = tmp_path / "src", tmp_path / "out"
    photometric = _write_good(src, 50, rng)
    good_bytes = (src / "good/p1/01.dcm").read_bytes()
    bad = _bad_files(rng, good_bytes)
    for rel, data in bad.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True); (src / rel).write_bytes(data)

    t = time.perf_counter()
    index, quarantine = preprocess_folder(src, out, size=32, workers=2)
    elapsed = time.perf_counter() - t

    assert sorted(index.source) == sorted(photometric), "every good file converted"
    assert sorted(quarantine.file) == sorted(bad), "every malformed file quarantined"
    assert quarantine.reason.str.len().min() > 5
    on_disk_index = pd.read_csv(out / "index.csv"); on_disk_quar = pd.read_csv(out / "quarantine.csv")
    assert len(on_disk_index) == 50 and len(on_disk_quar) == 200
    for kind in ("truncated", "random", "wrong_ts", "empty_pixels", "not_dicom"):
        assert quarantine.file.str.startswith(kind).sum() == 40, kind
    assert quarantine.set_index("file").reason.filter(like="not_dicom").str.contains("not a DICOM").all()
    for _, r in index.iterrows():
        png = np.asarray(Image.open(out / r.path))
        assert min(png.shape) == 32 and png.dtype == np.uint8
        left, right = png[:, :4].mean(), png[:, -4:].mean()   # stored values rise to the right
        assert (left > right + 100) if photometric[r.source] == "MONOCHROME1" else (right > left + 100), r.source
        assert r.inverted == (photometric[r.source] == "MONOCHROME1")
    assert set(index.transfer_syntax) >= {"Explicit VR Little Endian", "RLE Lossless", "JPEG 2000 Image Compression (Lossless Only)"}
    assert not list(out.rglob("*.xr0tmp"))
    assert all((out / r).resolve().is_relative_to(out.resolve()) for r in index.path)
    assert elapsed < 60, f"fuzz run took {elapsed:.1f}s"


def test_resume_after_deleting_outputs(tmp_path):
    rng = np.random.default_rng(1)
    src, out = tmp_path / "src", tmp_path / "out"
    _write_good(src, 12, rng)
    (src / "junk.bin").write_bytes(b"\x00\x01")
    index, quarantine = preprocess_folder(src, out, size=32, workers=2)
    assert (len(index), len(quarantine), index.attrs["converted"]) == (12, 1, 12)

    gone = list(index.path[:3])
    for p in gone: (out / p).unlink()
    kept_mtime = {p: (out / p).stat().st_mtime_ns for p in index.path[3:]}
    with open(out / "index.csv", "a") as f: f.write("good/p9/torn.png,good/p9/to")   # torn last line of a killed run
    (out / "good" / ".00.png.999.xr0tmp").write_bytes(b"\x89PNG half")          # stale temp file of a killed run
    time.sleep(0.01)

    index2, quarantine2 = preprocess_folder(src, out, size=32, workers=2)
    assert (index2.attrs["converted"], index2.attrs["skipped"]) == (3, 9)
    assert sorted(index2.path) == sorted(index.path) and len(quarantine2) == 1
    assert all((out / p).exists() for p in gone)
    assert all((out / p).stat().st_mtime_ns == m for p, m in kept_mtime.items()), "finished files untouched"
    assert not list(out.rglob("*.xr0tmp"))
    pd.testing.assert_frame_equal(index2.drop(columns=["source_mtime_ns"]), index.drop(columns=["source_mtime_ns"]))

    # a changed source file is converted again
    ds, _ = _good(0, rng); ds.save_as(src / index.source[5], enforce_file_format=True)
    index3, _ = preprocess_folder(src, out, size=32, workers=1)
    assert index3.attrs["converted"] == 1


def test_killed_run_resumes_without_half_files(tmp_path):
    "Kill the CLI mid-run (SIGKILL), then rerun: only the rest is converted and every listed PNG is whole."
    rng = np.random.default_rng(2)
    src, out = tmp_path / "src", tmp_path / "out"
    big = np.clip(rng.normal(2000, 600, (256, 256)), 0, 4095).astype(np.uint16)
    src.mkdir()
    for i in range(80):
        synthetic_dicom(np.roll(big, i, axis=1), "MONOCHROME2", 12).save_as(src / f"{i:03d}.dcm", enforce_file_format=True)
    code = ("import sys; from xr0_lib.data.dicom import cli_preprocess; "
            f"sys.exit(cli_preprocess(['--src', {str(src)!r}, '--out', {str(out)!r}, '--size', '256', '--workers', '1', '--compress-level', '9']))")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "XR0_PROGRESS": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (out / "index.csv").exists() and len((out / "index.csv").read_text().splitlines()) > 10: break
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed: os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be interrupted; make it longer"
    listed = pd.read_csv(out / "index.csv", on_bad_lines="skip").path.dropna()
    listed = [p for p in listed if (out / p).is_file()]
    assert 10 <= len(listed) < 80
    for p in listed: Image.open(out / p).load()   # whole files only

    index, quarantine = preprocess_folder(src, out, size=256, workers=2)
    assert len(index) == 80 and len(quarantine) == 0
    # everything listed is kept (a torn last row that pandas still parsed is the one allowed redo)
    assert index.attrs["skipped"] >= len(listed) - 1 and index.attrs["converted"] == 80 - index.attrs["skipped"]
    for p in index.path: Image.open(out / p).load()
    assert not list(out.rglob("*.xr0tmp"))


def _crashy(x: int) -> int:
    "Dies like a segfaulting decoder on 3, raises on 5."
    if x == 3: os._exit(11)
    if x == 5: raise ValueError("bad five")
    return x * 2


def test_worker_crash_is_pinned_on_its_item():
    res = {it: (ok, v) for it, ok, v in robust_map(_crashy, range(12), workers=2, window=4)}
    assert sorted(res) == list(range(12))
    assert res[3][0] is False and "worker process died" in res[3][1]
    assert res[5] == (False, "ValueError: bad five")
    assert all(res[i] == (True, 2 * i) for i in range(12) if i not in (3, 5))


def test_cli_preprocess(tmp_path, capsys):
    rng = np.random.default_rng(3)
    _write_good(tmp_path / "s", 2, rng)
    assert cli_preprocess(["--src", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--size", "16", "--pad", "--workers", "1"]) == 0
    assert "2 converted" in capsys.readouterr().out
    assert all(Image.open(p).size == (16, 16) for p in (tmp_path / "o").rglob("*.png"))
    with pytest.raises(SystemExit): cli_preprocess(["--src", "x"])
