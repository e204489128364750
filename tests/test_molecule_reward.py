"""Molecule property targets: metrics equal direct RDKit calls, token decoding, invalid-string penalty."""
import math

import numpy as np
import pytest
import selfies as sf
import torch
from rdkit import Chem, RDConfig, rdBase
from rdkit.Chem import QED, Crippen

from mamlib.energy.molecules import (
    MoleculePropertyTarget,
    PLAUSIBLE_RANGES,
    canonical_smiles,
    sa_score,
)

# benzene, ethanol, aspirin, caffeine
KNOWN = ["c1ccccc1", "CCO", "CC(=O)Oc1ccccc1C(=O)O", "Cn1c(=O)c2c(ncn2C)n(C)c1=O"]


def selfies_alphabet(smiles_list):
    encoded = [sf.encoder(s) for s in smiles_list]
    return sorted(sf.get_alphabet_from_selfies(encoded)) + ["[nop]"]


def selfies_tokens(smiles_list, alphabet, length=None):
    rows = [[alphabet.index(t) for t in sf.split_selfies(sf.encoder(s))] for s in smiles_list]
    length = length or max(len(r) for r in rows)
    pad = alphabet.index("[nop]")
    return torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long)


def smiles_tokens(strings, alphabet, length):
    return torch.tensor([[alphabet.index(c) for c in s.ljust(length)] for s in strings], dtype=torch.long)


ALPHABET = selfies_alphabet(KNOWN)
SMILES_ALPHABET = sorted(set("".join(KNOWN + ["((((", "C1=CC=CC=C1", "C(C)(C)(C)(C)C"]))) + [" "]


def direct_sa(monkeypatch, smiles):
    # RDKit's documented way to use its SA score: Contrib/SA_Score on sys.path (undone by monkeypatch).
    monkeypatch.syspath_prepend(RDConfig.RDContribDir + "/SA_Score")
    import sascorer
    return sascorer.calculateScore(Chem.MolFromSmiles(smiles))


@pytest.mark.parametrize("metric_name", ["logP", "QED", "SA"])
def test_properties_equal_direct_rdkit(metric_name, monkeypatch):
    target = MoleculePropertyTarget(ALPHABET, metric_name=metric_name)
    got = target.properties(selfies_tokens(KNOWN, ALPHABET))
    if metric_name == "logP":
        expected = [Crippen.MolLogP(Chem.MolFromSmiles(s)) for s in KNOWN]
    elif metric_name == "QED":
        expected = [QED.qed(Chem.MolFromSmiles(s)) for s in KNOWN]
    else:
        expected = [direct_sa(monkeypatch, s) for s in KNOWN]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_logp_of_benzene_is_textbook_value():
    # Crippen logP of benzene is about 1.69 (measured octanol/water logP 2.13); a wide window catches
    # a wrong metric or a wrong decoding, not RDKit version noise.
    value = MoleculePropertyTarget(ALPHABET).properties(selfies_tokens(["c1ccccc1"], ALPHABET))[0]
    assert 1.5 <= value <= 2.0


def test_sa_score_helper_and_ranges():
    assert sa_score(Chem.MolFromSmiles("CCO")) == pytest.approx(
        MoleculePropertyTarget(ALPHABET, metric_name="SA").properties(selfies_tokens(["CCO"], ALPHABET))[0])
    with pytest.raises(ValueError, match="at least one atom"):
        sa_score(None)


def test_selfies_round_trip_through_tokens():
    target = MoleculePropertyTarget(ALPHABET)
    x = selfies_tokens(KNOWN, ALPHABET, length=40)  # extra padding at the end
    assert target.strings(x) == [sf.encoder(s) for s in KNOWN]
    assert target.smiles(x) == [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in KNOWN]
    # '[nop]' in the middle of a row is dropped like trailing padding
    row = x[2].tolist()
    row.insert(3, ALPHABET.index("[nop]"))
    assert target.smiles(torch.tensor([row[:40]]))[0] == target.smiles(x[2:3])[0]


def test_stereo_is_removed_and_canonical_smiles():
    alphabet = sorted(set("C[C@H](N)C(=O)O")) + [" "]
    target = MoleculePropertyTarget(alphabet, string_type="SMILES")
    got = target.smiles(smiles_tokens(["C[C@H](N)C(=O)O"], alphabet, 20))
    assert got == [Chem.MolToSmiles(Chem.MolFromSmiles("CC(N)C(=O)O"))]
    assert "@" not in got[0]
    assert canonical_smiles("OCC") == Chem.MolToSmiles(Chem.MolFromSmiles("CCO"))
    assert canonical_smiles("") is None
    assert canonical_smiles("((((") is None


def test_invalid_strings_get_exactly_the_finite_penalty():
    log_status = rdBase.LogStatus()
    selfies_target = MoleculePropertyTarget(ALPHABET)
    pad, ring = ALPHABET.index("[nop]"), ALPHABET.index("[Ring1]")
    # all padding -> empty string; a lone ring symbol decodes to an empty SMILES
    x = torch.tensor([[pad] * 6, [ring] + [pad] * 5])
    penalty = selfies_target.invalid_penalty
    assert math.isfinite(penalty)
    assert selfies_target.log_f(x).tolist() == [penalty, penalty]
    assert np.isnan(selfies_target.properties(x)).all()
    assert selfies_target.smiles(x) == [None, None]

    smiles_target = MoleculePropertyTarget(SMILES_ALPHABET, string_type="SMILES", metric_name="QED")
    # unparsable, pentavalent carbon (fails sanitization), empty
    x = smiles_tokens(["((((", "C(C)(C)(C)(C)C", ""], SMILES_ALPHABET, 16)
    assert smiles_target.log_f(x).tolist() == [smiles_target.invalid_penalty] * 3
    # RDKit's error log was silenced only temporarily
    assert rdBase.LogStatus() == log_status


def test_default_penalty_formula_and_override():
    # -(max(|g_min - t|, |g_max - t|) + 0.1 (g_max - g_min))^2 / tau, logP range [-10, 10]
    assert MoleculePropertyTarget(ALPHABET, target_value=-4.0, tau=0.1).invalid_penalty == pytest.approx(-(14 + 2) ** 2 / 0.1)
    assert MoleculePropertyTarget(ALPHABET, metric_name="QED", target_value=0.9, tau=1.0).invalid_penalty == pytest.approx(-(0.9 + 0.1) ** 2)
    target = MoleculePropertyTarget(ALPHABET, invalid_penalty=-7.5)
    assert target.log_f(torch.full((1, 3), ALPHABET.index("[nop]"))).tolist() == [-7.5]
    assert target.describe()["invalid_penalty_source"] == "override"
    with pytest.raises(ValueError, match="finite"):
        MoleculePropertyTarget(ALPHABET, invalid_penalty=-math.inf)


@pytest.mark.parametrize("metric_name", ["logP", "QED", "SA"])
@pytest.mark.parametrize("target_value,tau", [(-4.0, 0.1), (4.0, 1.0), (0.5, 0.1), (12.0, 2.0)])
def test_penalty_below_every_plausible_valid_reward(metric_name, target_value, tau):
    target = MoleculePropertyTarget(ALPHABET, metric_name=metric_name, target_value=target_value, tau=tau)
    low, high = PLAUSIBLE_RANGES[metric_name]
    grid = np.linspace(low, high, 1001)  # the reward is a concave parabola: its minimum is at an end point
    worst_valid = (-((grid - target_value) ** 2) / tau).min()
    assert target.invalid_penalty < worst_valid
    assert (target.log_f(selfies_tokens(KNOWN, ALPHABET)).numpy() > target.invalid_penalty).all()


def test_log_f_formula():
    x = selfies_tokens(KNOWN, ALPHABET)
    logp = np.array([Crippen.MolLogP(Chem.MolFromSmiles(s)) for s in KNOWN])
    for target_value, tau in [(-4.0, 0.1), (4.0, 1.0)]:
        reward = MoleculePropertyTarget(ALPHABET, target_value=target_value, tau=tau).log_f(x)
        assert reward.dtype == torch.float64 and reward.shape == (4,)
        np.testing.assert_allclose(reward.numpy(), -((logp - target_value) ** 2) / tau, rtol=1e-12)
    # numpy input and whole-number float tokens give the same result
    target = MoleculePropertyTarget(ALPHABET)
    assert torch.equal(target.log_f(x.numpy()), target.log_f(x.double()))


def test_validity_uniqueness_on_hand_made_batch():
    target = MoleculePropertyTarget(SMILES_ALPHABET, string_type="SMILES")
    # benzene twice (aromatic and Kekule spellings), ethanol, two invalid -> 3/5 valid, 2 distinct of 3
    batch = ["c1ccccc1", "C1=CC=CC=C1", "CCO", "((((", ""]
    stats = target.validity_uniqueness(smiles_tokens(batch, SMILES_ALPHABET, 12))
    assert stats == {"validity": 3 / 5, "uniqueness": 2 / 3, "num": 5}
    # a space inside a row is padding and is dropped (RDKit alone would read 'CC O' as 'CC' named 'O')
    assert target.smiles(smiles_tokens(["CC O"], SMILES_ALPHABET, 6)) == [canonical_smiles("CCO")]
    assert math.isnan(target.validity_uniqueness(smiles_tokens([""], SMILES_ALPHABET, 3))["uniqueness"])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown metric 'logp'"):
        MoleculePropertyTarget(ALPHABET, metric_name="logp")
    with pytest.raises(ValueError, match="string_type"):
        MoleculePropertyTarget(ALPHABET, string_type="InChI")
    with pytest.raises(ValueError, match="padding symbol"):
        MoleculePropertyTarget(ALPHABET[:-1])
    with pytest.raises(ValueError, match="tau"):
        MoleculePropertyTarget(ALPHABET, tau=0.0)
    target = MoleculePropertyTarget(ALPHABET)
    with pytest.raises(ValueError, match="0..9"):
        target.log_f(torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match="0..9"):
        target.log_f(torch.tensor([[len(ALPHABET)]]))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        target.log_f(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="whole numbers"):
        target.log_f(torch.tensor([[0.5]]))


def test_describe():
    info = MoleculePropertyTarget(ALPHABET, metric_name="SA", target_value=2.0, tau=0.5).describe()
    assert info["metric_name"] == "SA" and info["target_value"] == 2.0 and info["tau"] == 0.5
    assert info["alphabet_size"] == len(ALPHABET) and info["padding_symbol"] == "[nop]"
    assert info["plausible_range"] == [1.0, 10.0]
