"""Models that come from elsewhere (a USB stick, another plant's backup, a crafted file): whatever their files
declare, loading one refuses it with one clear error before it allocates more than its files hold, and the service
keeps serving the good models beside it. test_artifact.py and test_manifest_fuzz.py cover the honest faults (a
truncated file, a flipped bit, a malformed field); these files lie about their sizes or are built to exhaust."""

from __future__ import annotations

import hashlib
import io
import os
import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from anomaly_service import AnomalyModel, ModelFormatError
from anomaly_service.api import create_app
from anomaly_service.artifact import read_artifact
from anomaly_service.cli import app
from anomaly_service.settings import ServiceSettings
from conftest import textured_part, write_manifest


@pytest.fixture
def model(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the session's model, to be altered."""
    return Path(shutil.copytree(model_dir / "part", tmp_path / "models" / "part"))


def _replace(model: Path, name: str, data: bytes) -> None:
    """Put ``data`` in the model as ``name`` with a manifest that vouches for it, as a crafted model would: its
    checksums prove nothing about who wrote it."""
    (model / name).write_bytes(data)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(model, manifest)


def _npy_header(shape: tuple[int, ...], descr: str = "<i8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_a_manifest_nested_beyond_the_parser_is_refused_in_one_line(model):
    (model / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFormatError, match="nested too deeply"):
        read_artifact(model)
    res = _cli("info", str(model))
    assert res.exit_code == 2 and "nested too deeply" in res.output and "Traceback" not in res.output


def test_a_manifest_larger_than_any_models_is_refused_unread(model):
    with open(model / "manifest.json", "r+b") as fh:
        fh.truncate(1 << 40)  # sparse: no room on the disk, but read whole it would be a terabyte
    with pytest.raises(ModelFormatError, match="larger than 64 MB, far beyond any model's manifest"):
        read_artifact(model)


def test_a_manifest_of_exactly_the_limit_is_read_and_one_byte_more_is_not(model):
    from anomaly_service.artifact import MANIFEST_MAX_BYTES

    text = (model / "manifest.json").read_bytes()
    (model / "manifest.json").write_bytes(text + b" " * (MANIFEST_MAX_BYTES - len(text)))  # JSON's own spaces
    read_artifact(model)
    (model / "manifest.json").write_bytes(text + b" " * (MANIFEST_MAX_BYTES + 1 - len(text)))
    with pytest.raises(ModelFormatError, match="larger than 64 MB"):
        read_artifact(model)


def test_a_file_larger_than_its_manifest_says_is_refused_by_its_size_unread(model):
    with open(model / "arrays.npz", "r+b") as fh:
        fh.truncate(1 << 40)
    with pytest.raises(ModelFormatError, match=f"{1 << 40} bytes, manifest says"):
        read_artifact(model)


def test_an_array_whose_header_declares_a_huge_shape_is_refused_before_it_is_allocated(model):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("selected_indices.npy", _npy_header((10**12,)) + bytes(64))
    _replace(model, "arrays.npz", buf.getvalue())
    with pytest.raises(ModelFormatError, match=r"declares \(1000000000000,\) of int64 .* but holds 64 bytes"):
        AnomalyModel.load(model)
    res = _cli("info", str(model))  # info reads no arrays: the model's files verify
    assert res.exit_code == 0
    res = _cli("score", "--model", str(model), str(model / "nothing.png"))
    assert res.exit_code == 2 and "declares" in res.output and "out of memory" not in res.output


def test_a_compressed_array_that_unpacks_far_beyond_its_file_is_refused(model):
    buf = io.BytesIO()
    n = (256 << 20) // 8
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("selected_indices.npy", "w") as member:
            member.write(_npy_header((n,)))
            for _ in range(16):
                member.write(bytes(n // 2))
    assert len(buf.getvalue()) < (1 << 20)
    _replace(model, "arrays.npz", buf.getvalue())
    with pytest.raises(ModelFormatError, match="unpacks to"):
        AnomalyModel.load(model)


def _archive(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _zip_patched(data: bytes, local: int, central: int, value: int, size: int = 2, orred: bool = False) -> bytes:
    """``data`` with the field at offset ``local`` of every local header and ``central`` of every central directory
    entry set to ``value`` (or or-ed with it)."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        at = out.find(signature)
        while at >= 0:
            field = slice(at + offset, at + offset + size)
            old = int.from_bytes(out[field], "little")
            out[field] = ((old | value) if orred else value).to_bytes(size, "little")
            at = out.find(signature, at + 4)
    return bytes(out)


def _deflated_and_cut() -> bytes:
    data = bytearray(_archive({"selected_indices.npy": _npy(np.arange(200))}, zipfile.ZIP_DEFLATED))
    data[60:100] = bytes(40)  # inside the member's deflate stream
    return bytes(data)


# numpy reads every member of an .npz, whatever its name: one without ".npy" that holds an array's header is read as
# that array (and allocated), one that holds none comes back as bytes
@pytest.mark.parametrize("archive,refusal", [
    (lambda: _archive({"selected_indices": _npy_header((10**12,)) + bytes(64)}), "magic string|declares"),
    (lambda: _archive({"selected_indices": b"not an array"}), "selected_indices is no numpy array"),
    (_deflated_and_cut, "unreadable"),
    (lambda: _zip_patched(_archive({"selected_indices.npy": _npy(np.arange(200))}), 8, 10, 99), "method 99"),
    (lambda: _zip_patched(_archive({"selected_indices.npy": _npy(np.arange(200))}), 6, 8, 1, orred=True),
     "encrypted"),
], ids=["array-without-npy-name", "bytes-without-npy-name", "cut-deflate-stream", "unknown-compression",
        "encrypted"])
def test_an_archive_member_numpy_or_zipfile_cannot_read_as_an_array_is_refused_naming_the_file(model, archive,
                                                                                                refusal):
    _replace(model, "arrays.npz", archive())
    with pytest.raises(ModelFormatError, match=f"arrays.npz.*({refusal})"):
        AnomalyModel.load(model)


def _npy_2_0(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    """``array`` as a ``.npy`` of format 2.0 (what numpy writes for a header over 64 KiB), declaring ``shape``."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": array.shape if shape is None else shape}
    np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue() + array.tobytes()


def test_an_array_of_npy_format_2_reads_and_is_held_to_its_bytes_and_a_later_format_is_named():
    """numpy writes format 2.0 where an array's header passes 64 KiB: such an archive reads as its arrays, and its
    header is checked against its bytes as a 1.0 one is; a format numpy has no reader of here is refused by name."""
    from anomaly_service.artifact import bytes_to_arrays

    arrays = bytes_to_arrays(_archive({"selected_indices.npy": _npy_2_0(np.arange(7))}), "arrays.npz")
    assert arrays["selected_indices"].tolist() == list(range(7))
    with pytest.raises(ModelFormatError, match=r"arrays.npz: selected_indices.npy declares \(1000000000000,\)"):
        bytes_to_arrays(_archive({"selected_indices.npy": _npy_2_0(np.arange(8), (10**12,))}), "arrays.npz")
    later = bytearray(_npy(np.arange(7)))
    later[6] = 3  # the magic's major version
    with pytest.raises(ModelFormatError, match=r"arrays.npz: selected_indices.npy is of .npy format \(3, 0\)"):
        bytes_to_arrays(_archive({"selected_indices.npy": bytes(later)}), "arrays.npz")


def test_an_archive_that_does_not_read_is_refused_with_the_reason():
    from anomaly_service.artifact import bytes_to_arrays

    with pytest.raises(ModelFormatError, match=r"^arrays.npz is unreadable \(File is not a zip file\)$"):
        bytes_to_arrays(b"PK" + bytes(100), "arrays.npz")


def _mixed(zeros: int, stored: np.ndarray) -> bytes:
    """An archive of a stored member holding ``stored`` and a deflated one of ``zeros`` bytes in all (its header
    included)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("stored.npy", _npy(stored), compress_type=zipfile.ZIP_STORED)
        header = len(_npy(np.zeros(0, np.uint8)))
        archive.writestr("zeros.npy", _npy(np.zeros(zeros - header, np.uint8)), compress_type=zipfile.ZIP_DEFLATED,
                         compresslevel=1)
    return buf.getvalue()


def test_a_compressed_archive_may_unpack_to_the_floor_or_eight_times_its_bytes_and_no_more():
    """The zip-bomb bound is the larger of UNPACK_FLOOR_BYTES and UNPACK_RATIO times the file: an archive of small
    arrays compressed well reads up to the floor, a large compressed one up to the ratio, and one member compressed
    is enough for the bound to hold (a stored member beside it changes nothing)."""
    from anomaly_service.artifact import UNPACK_FLOOR_BYTES, UNPACK_RATIO, bytes_to_arrays

    small = np.arange(4, dtype=np.uint8)
    at_floor = UNPACK_FLOOR_BYTES - len(_npy(small))
    assert len(bytes_to_arrays(_mixed(at_floor, small))["zeros"]) > 0
    with pytest.raises(ModelFormatError, match=f"unpacks to {UNPACK_FLOOR_BYTES + 1} bytes"):
        bytes_to_arrays(_mixed(at_floor + 1, small))
    noise = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8)  # does not compress: the file's bytes
    data = _mixed(UNPACK_FLOOR_BYTES, noise)
    assert UNPACK_FLOOR_BYTES < len(_npy(noise)) + UNPACK_FLOOR_BYTES <= UNPACK_RATIO * len(data)
    assert bytes_to_arrays(data)["stored"].shape == noise.shape


def test_a_faiss_index_that_declares_more_than_it_holds_is_refused_before_it_is_allocated(model):
    data = bytearray((model / "index.faiss").read_bytes())
    assert data[:4] == b"IxF2"  # a flat L2 index: fourcc, d, ntotal, two dummies, is_trained, metric, codes
    at = 4 + 4 + 8 + 8 + 8 + 1 + 4
    data[at:at + 8] = struct.pack("<Q", 1 << 37)  # half a terabyte of floats, under FAISS's own limit
    _replace(model, "index.faiss", bytes(data))
    with pytest.raises(ModelFormatError, match=f"declares an array larger than its own {len(data)} bytes"):
        AnomalyModel.load(model)


def test_the_service_serves_the_good_model_beside_models_built_to_exhaust_it(model_dir, tmp_path):
    root = tmp_path / "served"
    shutil.copytree(model_dir / "part", root / "good")
    nested = Path(shutil.copytree(model_dir / "part", root / "nested"))
    (nested / "manifest.json").write_text("{\"a\": " * 50_000 + "1" + "}" * 50_000)
    shape = Path(shutil.copytree(model_dir / "part", root / "shape"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("selected_indices.npy", _npy_header((10**12,)) + bytes(64))
    _replace(shape, "arrays.npz", buf.getvalue())
    app_ = create_app(ServiceSettings(model_dir=root, reload_interval=0, runtime="torch", device="cpu"))
    with TestClient(app_) as client:
        listing = client.get("/models").json()
        assert [m["name"] for m in listing["models"]] == ["good"]
        assert "nested too deeply" in listing["errors"]["nested"]
        assert "declares" in listing["errors"]["shape"]
        for name in ("nested", "shape"):
            res = client.post(f"/models/{name}/reload")
            assert 400 <= res.status_code < 500 or res.status_code == 503, (res.status_code, res.text)


# ------------------------------------------------------------------ an archive copied in with its links
def test_a_prune_through_an_archive_that_links_elsewhere_deletes_nothing_there_but_versions(fitted_model, tmp_path):
    from anomaly_service.artifact import prune_versions

    elsewhere = tmp_path / "projects"
    for i in range(4):
        (elsewhere / f"project{i}").mkdir(parents=True)
        (elsewhere / f"project{i}" / "notes.txt").write_text("keep me")
    (tmp_path / "models" / ".versions").mkdir(parents=True)
    (tmp_path / "models" / ".versions" / "m").symlink_to(elsewhere)
    path = tmp_path / "models" / "m"
    for _ in range(3):
        fitted_model.save(path, keep_versions=1)  # each save archives the version it replaces and prunes
    assert prune_versions(path, 0) != []  # the versions it archived there are its to prune
    assert sorted(p.name for p in elsewhere.iterdir() if not p.name.startswith(".")) == [
        f"project{i}" for i in range(4)]
    assert all((elsewhere / f"project{i}" / "notes.txt").read_text() == "keep me" for i in range(4))


def test_a_change_log_that_is_a_symbolic_link_is_not_written_through(model, tmp_path, caplog):
    from anomaly_service import model_history

    outside = tmp_path / "bashrc"
    outside.write_text("precious\n")
    log = model_history.history_path(model)
    log.parent.mkdir(parents=True)
    log.symlink_to(outside)
    assert model_history.record(model, "rollback", "v2", "v1", by="someone") is None
    assert outside.read_text() == "precious\n"
    assert "symbolic link" in caplog.text
    assert model_history.read(model) == []


def test_a_change_log_with_other_hard_links_is_made_a_file_of_its_own_before_an_entry_is_added(model, tmp_path):
    from anomaly_service import model_history

    log = model_history.history_path(model)
    log.parent.mkdir(parents=True)
    assert model_history.record(model, "fit", "v1", None) is not None
    snapshot = tmp_path / "snapshot-history.jsonl"  # a backup made with hard links (cp -al, rsync --link-dest)
    os.link(log, snapshot)
    before = snapshot.read_bytes()
    assert model_history.record(model, "rollback", "v2", "v1") is not None
    assert snapshot.read_bytes() == before
    assert [e["version"] for e in model_history.read(model)] == ["v2", "v1"]
    assert log.stat().st_nlink == 1


# ------------------------------------------------------------------ an index that disagrees with itself or the bank
def _bank(model: Path) -> np.ndarray:
    from anomaly_service.index import deserialize

    index = deserialize((model / "index.faiss").read_bytes())
    return index.reconstruct_n(0, index.ntotal)


def _ivf(bank: np.ndarray, graph: bool = False, kind: str = "ivf"):
    """The product's own ivf (or ivfpq) over ``bank``, its lists found by an HNSW graph where ``graph`` (the product
    builds one beyond 3072 lists; made here over 8)."""
    from anomaly_service import index as ix

    at = ix.QUANTIZER_GRAPH_LISTS
    ix.QUANTIZER_GRAPH_LISTS = 1 if graph else at
    try:
        return ix.build_index(bank, kind, nlist=8, nprobe=32)
    finally:
        ix.QUANTIZER_GRAPH_LISTS = at


def _list_ids(index, number: int) -> np.ndarray:
    import faiss

    lists = faiss.extract_index_ivf(index).invlists
    return faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number))  # writable: the index's own ids


def _first_row(index) -> np.ndarray:
    import faiss

    top = faiss.downcast_index(index)
    rows = faiss.downcast_index(top.refine_index) if isinstance(top, faiss.IndexRefine) else top
    return faiss.rev_swig_ptr(rows.get_xb(), rows.d)


def _more_centroids(index) -> None:
    import faiss

    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    quantizer.add(quantizer.reconstruct_n(0, 3) + 0.001)  # lists 8 to 10, which do not exist


def _fewer_centroids(index) -> None:
    import faiss

    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    kept = quantizer.reconstruct_n(0, 4)
    quantizer.reset()
    quantizer.add(kept)  # lists 4 to 7 never probed: their rows hidden from every search


def _graph_of_self_loops(index) -> None:
    import faiss

    hnsw = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).hnsw
    links = faiss.rev_swig_ptr(hnsw.neighbors.data(), hnsw.neighbors.size())
    offsets = faiss.vector_to_array(hnsw.offsets)
    for node in range(len(offsets) - 1):  # every node linked to itself alone: the search never leaves the entry
        span = links[offsets[node] : offsets[node + 1]]
        span[span >= 0] = node


def _remap_shuffled(index) -> None:
    import faiss

    pre = faiss.downcast_index(faiss.downcast_index(index).base_index)
    remap = faiss.downcast_VectorTransform(pre.chain.at(0))
    faiss.rev_swig_ptr(remap.map.data(), remap.map.size())[0] = 10**6


@pytest.mark.parametrize("graph, mutate, refusal", [
    (False, lambda ix: _list_ids(ix, 0).__setitem__(0, 10**9), "list 0 names row 1000000000, outside the bank"),
    (False, lambda ix: _list_ids(ix, 0).__setitem__(0, -7), "list 0 names row -7"),
    (False, lambda ix: _list_ids(ix, 0).__setitem__(slice(None), _list_ids(ix, 0)[0]), "lists, where every row"),
    (False, _more_centroids, "11 centroids of .* does not find its 8 lists"),
    (False, _fewer_centroids, "4 centroids of .* does not find its 8 lists"),
    (False, _remap_shuffled, "transform is not the zero padding"),
    (True, _graph_of_self_loops, "the graph over its lists leads"),
    (False, lambda ix: _first_row(ix).__setitem__(3, np.nan), "bank rows hold NaN"),
    (False, lambda ix: _first_row(ix).__setitem__(3, 1e30), "bank rows hold 1e\\+30"),
])
def test_an_ivf_index_that_disagrees_with_itself_is_refused_naming_the_field(model, graph, mutate, refusal):
    """Each was read as it stood: an id past the bank read memory outside it (a segfault of `anomaly score` at
    1e9), a duplicated id or missing centroids hid rows from every search and more centroids than lists failed
    every search with a traceback, a graph linked to itself found one list for every query, and a NaN or 1e30 in a
    row gave every part a NaN or a huge score (good parts flagged)."""
    import faiss

    from anomaly_service.index import deserialize, serialize

    index = _ivf(_bank(model), graph)
    deserialize(serialize(index))  # the honest one loads
    mutate(index)
    with pytest.raises(ModelFormatError, match=refusal):
        deserialize(faiss.serialize_index(index).tobytes())


@pytest.mark.parametrize("structure", ["IndexIDMap", "IndexFlatIP", "IndexHNSWFlat"])
def test_an_index_of_a_structure_no_fit_writes_is_refused(model, structure):
    """An ID map's ids need not be rows of the bank; an inner-product or HNSW bank scored every part as anomalous."""
    import faiss

    from anomaly_service.index import deserialize

    bank = _bank(model)
    index = {"IndexIDMap": lambda: faiss.IndexIDMap(faiss.IndexFlatL2(bank.shape[1])),
             "IndexFlatIP": lambda: faiss.IndexFlatIP(bank.shape[1]),
             "IndexHNSWFlat": lambda: faiss.IndexHNSWFlat(bank.shape[1], 2)}[structure]()
    if structure == "IndexIDMap":
        index.add_with_ids(bank, np.arange(len(bank), dtype=np.int64) + 10**6)
    else:
        index.add(bank)
    with pytest.raises(ModelFormatError, match=structure):
        deserialize(faiss.serialize_index(index).tobytes())


def test_an_ivf_whose_list_names_a_row_past_the_bank_is_refused_by_score_not_a_segfault(model):
    import faiss
    import subprocess
    import sys

    from PIL import Image

    index = _ivf(_bank(model))
    _list_ids(index, 0)[0] = 10**9
    _replace(model, "index.faiss", faiss.serialize_index(index).tobytes())
    photo = model.parent / "photo.png"
    Image.fromarray(textured_part(np.random.default_rng(5))).save(photo)
    res = subprocess.run([sys.executable, "-m", "anomaly_service.cli", "score", "--model", str(model), str(photo)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "list 0 names row 1000000000, outside the bank" in res.stdout + res.stderr


@pytest.mark.parametrize("selected, refusal", [
    (lambda s: np.r_[s[:1], s[:-1]], "int64 and 1 repeated"),
    (lambda s: s.astype(np.float64) + 0.5, "float64"),
])
def test_selected_indices_repeated_or_fractional_are_refused(model, selected, refusal):
    """A repeated index read one feature twice against a bank fitted on distinct ones (good parts at 80
    normalized); a fractional one was truncated to another feature."""
    arrays = dict(np.load(model / "arrays.npz"))
    arrays["selected_indices"] = selected(arrays["selected_indices"])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _replace(model, "arrays.npz", buf.getvalue())
    with pytest.raises(ModelFormatError, match=f"selected_indices are {refusal}"):
        AnomalyModel.load(model)


@pytest.mark.parametrize("field, value", [("threshold", 1e300), ("floor", -1e300)])
def test_a_threshold_or_floor_no_score_reaches_is_refused_naming_it(model, field, value):
    """A threshold of 1e300 passed every part as normal (normalized 0.000); a floor of -1e300 flagged every part."""
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["calibration"][field] = value
    write_manifest(model, manifest)
    with pytest.raises(ModelFormatError, match=f"calibration.{field}"):
        read_artifact(model)


# ------------------------------------------------------------------ the whole-image branch's network
@pytest.fixture(scope="module")
def branch_model(tmp_path_factory) -> Path:
    """A model with the whole-image branch fused (boards have a layout), saved once for this module."""
    from conftest import board

    rng = np.random.default_rng(3)
    fitted = AnomalyModel(backbone="efficientnet_lite0", image_size=96, coreset_ratio=0.25, progress=False,
                          device="cpu", autoencoder="global", ae_epochs=3).fit([board(rng) for _ in range(10)])
    assert fitted.autoencoder_ is not None
    path = tmp_path_factory.mktemp("branch") / "board"
    fitted.save(path)
    AnomalyModel.load(path, device="cpu")  # the honest one loads
    return path


@pytest.fixture
def branch(branch_model, tmp_path) -> Path:
    return Path(shutil.copytree(branch_model, tmp_path / "models" / "board"))


def _edit_network(model: Path, edit) -> None:
    import torch

    state = torch.load(model / "autoencoder.pt", weights_only=True)
    edit(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    _replace(model, "autoencoder.pt", buf.getvalue())


@pytest.mark.parametrize("tensor, value, refusal", [
    ("net.head.bias", float("nan"), "'net.head.bias' holds NaN"),
    ("net.head.weight", float("inf"), "'net.head.weight' holds .* to inf"),
    ("net.encoder.0.0.weight", 1e20, "'net.encoder.0.0.weight' holds .* to 1e\\+20"),
    ("mean", float("nan"), "'mean' holds NaN"),
    ("std", 0.0, "'std' holds 0 to"),
    ("std", -1.0, "'std' holds -1 to"),
])
def test_a_branch_network_holding_what_no_fit_writes_is_refused_naming_the_tensor(branch, tensor, value, refusal):
    """A NaN, infinite or 1e30 weight, a NaN mean or a zero std made every fused score NaN and every decision normal
    (a feature autoencoder fused by mean: defects at 17 normalized passed); under the branch's excess rule a NaN
    silenced the branch (a board missing its lug at 2.1 where it was 14.5); a negative std flagged every part."""
    _edit_network(branch, lambda state: state[tensor].view(-1).__setitem__(0, value))
    with pytest.raises(ModelFormatError, match=f"autoencoder.pt: {refusal}"):
        AnomalyModel.load(branch, device="cpu")


# ------------------------------------------------------------------ calibrations against the scores they keep
@pytest.mark.parametrize("section, value", [
    ("calibration", 1e5), ("calibration", "+20%"),
    ("fusion.knn_calibration", 1e5), ("autoencoder.calibration", 1e5),
])
def test_a_threshold_edited_apart_from_the_scores_it_was_set_from_is_refused(branch, section, value):
    """Every release sets a threshold by one rule over the scores it keeps beside it: 1e5 against kNN scores near
    20 passed every part as normal (a defect at 0.001 normalized); raised by a fifth, it let through what it
    should flag. The branch's own may also be raised to its learnt bound, which it then equals."""
    manifest = json.loads((branch / "manifest.json").read_text())
    cal = manifest
    for key in section.split("."):
        cal = cal[key]
    cal["threshold"] = cal["threshold"] * 1.2 if value == "+20%" else value
    if section == "calibration" and manifest["fusion"]["rule"] == "excess":  # the decision's is the kNN's
        manifest["fusion"]["knn_calibration"]["threshold"] = cal["threshold"]
    write_manifest(branch, manifest)
    with pytest.raises(ModelFormatError, match=rf"{section}: threshold .* is not what its \d+ holdout_scores"):
        read_artifact(branch)


def test_a_threshold_raised_with_its_floor_as_if_the_rule_fell_below_it_is_refused(model):
    """Where the rule falls to the floor, a fit sets the threshold just above it; a floor edited up to 99,900 with a
    threshold of 1e5 just above it passed every part. An honest floor is a median of the maps' pixels, none of
    which lies above its own map's score."""
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["calibration"].update(threshold=1e5, floor=1e5 / 1.001)
    write_manifest(model, manifest)
    with pytest.raises(ModelFormatError, match="calibration: threshold 100000 is not what its"):
        read_artifact(model)


def test_a_branch_threshold_raised_to_its_learnt_bound_loads(branch):
    manifest = json.loads((branch / "manifest.json").read_text())
    bound = manifest["autoencoder"]["training"]["learnt_bound"]
    manifest["autoencoder"]["calibration"]["threshold"] = bound["threshold"] = 2 * bound["threshold"] + 1
    write_manifest(branch, manifest)
    read_artifact(branch)


def test_a_nan_among_the_calibration_scores_is_refused_naming_it(model):
    """A NaN there was read into the drift monitor's score reference and the threshold an update keeps."""
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["calibration"]["holdout_scores"][1] = float("nan")
    write_manifest(model, manifest)
    with pytest.raises(ModelFormatError, match="calibration.holdout_scores.1: Input should be a finite number"):
        read_artifact(model)


# ------------------------------------------------------------------ the grids an update re-calibrates on
def _edit_grids(model: Path, edit) -> None:
    arrays = dict(np.load(model / "calibration.npz"))
    for name in [n for n in arrays if n.startswith("grid_")]:
        arrays[name] = edit(arrays[name])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _replace(model, "calibration.npz", buf.getvalue())


@pytest.mark.parametrize("edit, refusal", [
    (lambda g: np.where(np.arange(g.size).reshape(g.shape) == 0, np.float16(np.inf), g),
     "grid_0000 holds NaN or infinity"),
    (lambda g: np.full_like(g, 6e4), "grid_0000 scores .* against the bank, where the model's calibration keeps"),
])
def test_calibration_grids_unlike_the_scores_the_model_keeps_refuse_an_update(model, edit, refusal):
    """The grids an update re-calibrates on, checksums consistent: one infinite value set a threshold just above
    the floor (4 of 6 good parts flagged, the drift reference's median at 202 normalized), grids of 6e4 a threshold
    of 5e5 that passed every defect. The model still scores as before."""
    from PIL import Image

    _edit_grids(model, edit)
    photo = model.parent / "good.png"
    Image.fromarray(textured_part(np.random.default_rng(11))).save(photo)
    loaded = AnomalyModel.load(model, device="cpu")
    with pytest.raises(ModelFormatError, match=f"calibration.npz.*{refusal}"):
        loaded.update([photo])


# ------------------------------------------------------------------ anomaly info --verify
def test_info_verify_refuses_what_a_load_or_an_update_refuses_and_passes_an_honest_model(model):
    """`anomaly info` checks the files against the manifest and reads no index, array or network: a crafted model
    was reported fine and refused only once served. --verify makes the service's load and the update's checks."""
    res = _cli("info", "--verify", str(model))
    assert res.exit_code == 0 and "verified         loads as the service loads it" in res.output, res.output
    assert "calibration grids score as the scores it keeps" in res.output
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("selected_indices.npy", _npy_header((10**12,)) + bytes(64))
    arrays = (model / "arrays.npz").read_bytes()
    _replace(model, "arrays.npz", buf.getvalue())
    assert _cli("info", str(model)).exit_code == 0  # the files match the manifest
    res = _cli("info", "--verify", str(model))
    assert res.exit_code == 2 and res.output.startswith("error: ") and "declares" in res.output, res.output
    assert "Traceback" not in res.output and "verified" not in res.output
    _replace(model, "arrays.npz", arrays)
    _edit_grids(model, lambda g: np.full_like(g, 6e4))
    res = _cli("info", "--verify", str(model))
    assert res.exit_code == 2 and "calibration.npz: grid_0000 scores" in res.output, res.output


def test_info_verify_refuses_scores_raised_with_the_threshold_they_set(model):
    """Scores and threshold edited together agree with each other (the load cannot tell): 1e4 times an honest
    model's passed every part. Re-scored, the stored grids score as before (honest: within 3e-4 of what is kept)."""
    from anomaly_service.calibration import threshold_rule

    manifest = json.loads((model / "manifest.json").read_text())
    cal = manifest["calibration"]
    cal["holdout_scores"] = [s * 1e4 for s in cal["holdout_scores"]]
    cal["threshold"] = threshold_rule(np.array(cal["holdout_scores"]), manifest["config"]["threshold_sigma"])[0]
    write_manifest(model, manifest)
    read_artifact(model)
    res = _cli("info", "--verify", str(model))
    assert res.exit_code == 2 and "the scores its threshold was set from are not its images'" in res.output, \
        res.output


class _TouchesWhenUnpickled:
    """An object whose unpickling creates a file: the proof that a loader ran a pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


@pytest.mark.parametrize("member", ["selected_indices.npy", "bank_sources.npy"])
def test_an_array_stored_as_a_pickle_is_refused_and_never_unpickled(model, tmp_path, member):
    """An array of Python objects is stored as a pickle, which names the module that made it: one written under
    NumPy 2 fails under NumPy 1 with "No module named 'numpy._core'" (numpy#27084), and unpickling a file runs
    what it names. The model's arrays are read as plain data only: such a member is refused naming its file, and
    what it holds never runs, whichever NumPy wrote it."""
    ran = tmp_path / "ran"
    buf = io.BytesIO()
    np.save(buf, np.array([_TouchesWhenUnpickled(ran)], dtype=object), allow_pickle=True)
    _replace(model, "arrays.npz", _archive({member: buf.getvalue()}))
    with pytest.raises(ModelFormatError, match="arrays.npz"):
        AnomalyModel.load(model)
    assert not ran.exists()
