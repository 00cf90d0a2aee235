"""Real-data report scorers (issue #23): a CheXbert labeller loads from a local folder through one code path whatever
the checkpoint's form (the original `chexbert.pth` layout, zip or legacy, or safetensors), labels deterministically,
refuses a checkpoint that pickles anything but tensors, names what is missing; its F1s equal scikit-learn's and the
`f1chexbert` package's; and the report generation experiment adds CheXbert F1 rows on real reports when a folder is
given and says why it skipped them otherwise."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report, f1_score
from transformers import BertConfig, BertModel

from xr0_lib.core import get_settings
from xr0_lib.eval.report_metrics import (CHEXBERT_5, CHEXBERT_OBSERVATIONS, RADGRAPH_SKIP, bootstrap_reports, chexbert_f1,
                                         chexbert_folder, load_chexbert, optional_chexbert, report_stats, save_chexbert)

torch.set_num_threads(1)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *("no pleural effusion small left right heart size is normal the lungs "
         "are clear . , cardiomegaly edema pneumothorax mild moderate enlarged ##s".split())]
REPORTS = ["No pleural effusion.", "Small left pleural effusions.\n\nCardiomegaly.", "", "The lungs are clear.",
           "Mild edema, enlarged heart.", "the heart " * 400]


def tiny_state(seed=0, hidden=32, positions=600):
    "A random CheXbert-shaped state dict (bert.*, linear_heads.*) and its config, scaled so that labels vary between reports."
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=positions, initializer_range=0.3)   # wide init: [CLS] states differ between reports
    torch.manual_seed(seed)
    sd = {f"bert.{k}": v for k, v in BertModel(cfg).state_dict().items()}
    for i in range(14):
        n = 4 if i < 13 else 2
        sd[f"linear_heads.{i}.weight"] = torch.randn(n, hidden) * 3
        sd[f"linear_heads.{i}.bias"] = torch.zeros(n)
    return sd, cfg


@pytest.fixture
def folder(tmp_path):
    "A CheXbert folder in the layout of the real one: vocab, config and the original chexbert.pth (zip format)."
    d = tmp_path / "chexbert"; d.mkdir()
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    sd, cfg = tiny_state()
    cfg.to_json_file(str(d / "config.json"))
    torch.save({"epoch": 7, "model_state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                                         "param_groups": [{"lr": 2e-5, "params": [0]}]}}, d / "chexbert.pth")
    return d


NO_SETTINGS = get_settings(env={})
NO_SETTINGS.weights.pop("chexbert", None)


def test_original_layout_loads_and_labels_deterministically(folder):
    chex = load_chexbert(folder, settings=NO_SETTINGS)
    lab = chex.label(REPORTS)
    assert lab.shape == (len(REPORTS), 14) and lab.dtype == np.int64
    assert (lab[:, :13] < 4).all() and set(lab[:, 13]) <= {0, 1}
    assert len({tuple(r) for r in lab}) > 1                                    # reports get different labels
    assert np.array_equal(chex.label(REPORTS[::-1], batch_size=2), lab[::-1])   # order and batch size change nothing
    assert np.array_equal(load_chexbert(folder, settings=NO_SETTINGS).label(REPORTS), lab)   # a fresh load: same labels
    # the labels are the argmax of each head on the [CLS] state of BertModel: checked against a plain forward
    sd, cfg = tiny_state()
    bert = BertModel(cfg).eval(); bert.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("bert.")})
    enc = chex.tokenizer(["Mild edema, enlarged heart."], return_tensors="pt")
    with torch.no_grad(): cls = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
    want = [int((cls @ sd[f"linear_heads.{i}.weight"].T + sd[f"linear_heads.{i}.bias"]).argmax()) for i in range(14)]
    assert chex.label(["Mild  edema,\nenlarged heart. "])[0].tolist() == want   # whitespace cleaned as the original does


def test_every_checkpoint_form_gives_the_same_labels(folder, tmp_path):
    want = load_chexbert(folder, settings=NO_SETTINGS).label(REPORTS)
    ck = torch.load(folder / "chexbert.pth", weights_only=True)
    torch.save(ck, folder / "chexbert.pth", _use_new_zipfile_serialization=False)   # torch's legacy format (2020-era files)
    assert np.array_equal(load_chexbert(folder, settings=NO_SETTINGS).label(REPORTS), want)
    torch.save(ck["model_state_dict"], folder / "chexbert.pth")                      # a bare state dict
    assert np.array_equal(load_chexbert(folder, settings=NO_SETTINGS).label(REPORTS), want)
    conv = save_chexbert(load_chexbert(folder, settings=NO_SETTINGS), tmp_path / "converted")
    assert (conv / "chexbert.safetensors").is_file() and not (conv / "chexbert.pth").exists()
    chex = load_chexbert(conv, settings=NO_SETTINGS)
    assert chex.source.endswith("chexbert.safetensors") and np.array_equal(chex.label(REPORTS), want)
    (folder / "chexbert.pth").rename(folder / "old.pth")   # safetensors beside the vocab, keys still in the module.* layout
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ck["model_state_dict"].items()}, str(folder / "chexbert.safetensors"))
    assert np.array_equal(load_chexbert(folder, settings=NO_SETTINGS).label(REPORTS), want)


class _Touch:
    "Unpickling this creates a file: the checkpoint must be refused before that can happen."
    def __init__(self, path): self.path = path
    def __reduce__(self): return (Path.touch, (self.path,))


def test_a_pickled_object_is_refused_and_never_run(folder, tmp_path):
    marker = tmp_path / "ran"
    ck = torch.load(folder / "chexbert.pth", weights_only=True)
    ck["hook"] = _Touch(marker)
    torch.save(ck, folder / "chexbert.pth")
    with pytest.raises(ValueError, match="chexbert.pth refused: it pickles"): load_chexbert(folder, settings=NO_SETTINGS)
    assert not marker.exists()


def test_missing_and_wrong_files_are_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \[weights\] chexbert entry.*chexbert.pth.*vocab.txt"):
        load_chexbert(settings=NO_SETTINGS)
    with pytest.raises(FileNotFoundError, match=r"nowhere.: no such folder and no \[weights\] name"): load_chexbert(tmp_path / "nowhere", settings=NO_SETTINGS)
    s = get_settings(env={"XR0_WEIGHT_CHEXBERT": str(tmp_path / "gone")})
    with pytest.raises(FileNotFoundError, match=r"\[weights\] chexbert = .*gone is not a folder"): load_chexbert(settings=s)
    assert chexbert_folder(settings=get_settings(env={"XR0_WEIGHT_CHEXBERT": str(folder)})) == folder
    chex, note = optional_chexbert(settings=NO_SETTINGS)
    assert chex is None and note.startswith("CheXbert F1 skipped") and "[weights] chexbert" in note
    assert "not available" in RADGRAPH_SKIP
    c = json.loads((folder / "config.json").read_text()); c["auto_map"] = {"AutoModel": "x.Y"}
    (folder / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="auto_map"): load_chexbert(folder, settings=NO_SETTINGS)
    c.pop("auto_map"); wider = dict(c, hidden_size=64, intermediate_size=128)
    (folder / "config.json").write_text(json.dumps(wider))
    with pytest.raises(ValueError, match="check config.json"): load_chexbert(folder, settings=NO_SETTINGS)
    (folder / "config.json").write_text(json.dumps(c)); (folder / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"): load_chexbert(folder, settings=NO_SETTINGS)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    sd = torch.load(folder / "chexbert.pth", weights_only=True)["model_state_dict"]
    sd.pop("module.linear_heads.13.bias"); sd["module.classifier.weight"] = torch.zeros(1)
    torch.save({"model_state_dict": sd}, folder / "chexbert.pth")
    with pytest.raises(ValueError, match=r"missing keys \['linear_heads.13.bias'\], unexpected keys \['classifier.weight'\]"):
        load_chexbert(folder, settings=NO_SETTINGS)


def _f1chexbert_rrg(classes):
    "f1chexbert's 'rrg' mode: blank 0, positive 1, negative 0, uncertain 1."
    return np.vectorize({0: 0, 1: 1, 2: 0, 3: 1}.get)(classes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_equals_sklearn_and_f1chexbert(seed):
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 4, (40, 14)); hyp = np.where(rng.random((40, 14)) < 0.7, ref, rng.integers(0, 4, (40, 14)))
    ref[:, 13] %= 2; hyp[:, 13] %= 2
    ref[:, 4] = np.where(ref[:, 4] == 1, 2, ref[:, 4]); hyp[:, 4] = np.where(hyp[:, 4] == 1, 2, hyp[:, 4])   # Edema: never positive
    f = chexbert_f1(hyp, ref)
    assert f["chexbert_f1_14_micro"] == pytest.approx(f1_score(ref == 1, hyp == 1, average="micro"), abs=1e-12)
    five = [CHEXBERT_OBSERVATIONS.index(o) for o in CHEXBERT_5]
    assert f["chexbert_f1_5_macro"] == pytest.approx(f1_score(ref[:, five] == 1, hyp[:, five] == 1, average="macro", zero_division=0), abs=1e-12)
    for j, o in enumerate(CHEXBERT_OBSERVATIONS):
        if j != 4: assert f["chexbert_f1_" + o.lower().replace(" ", "_")] == pytest.approx(f1_score(ref[:, j] == 1, hyp[:, j] == 1), abs=1e-12)
    assert np.isnan(f["chexbert_f1_edema"])
    # with uncertain as positive, the numbers of f1chexbert's classification_report (what CXformer and RadEval report)
    g = chexbert_f1(hyp, ref, uncertain_positive=True)
    r, h = _f1chexbert_rrg(ref), _f1chexbert_rrg(hyp)
    cr = classification_report(r, h, output_dict=True, zero_division=0)
    cr5 = classification_report(r[:, five], h[:, five], output_dict=True, zero_division=0)
    for tag, rep in (("14", cr), ("5", cr5)):
        assert g[f"chexbert_f1_{tag}_micro"] == pytest.approx(rep["micro avg"]["f1-score"], abs=1e-12)
        assert g[f"chexbert_f1_{tag}_macro"] == pytest.approx(rep["macro avg"]["f1-score"], abs=1e-12)


def test_bootstrap_rows_and_paired_differences(folder):
    chex = load_chexbert(folder, settings=NO_SETTINGS)
    refs = [r for r in REPORTS if r] * 6; good, bad = list(refs), [REPORTS[0]] * len(refs)
    stats = {"good": report_stats(good, refs, chexbert=chex), "bad": report_stats(bad, refs, chexbert=chex)}
    bt = bootstrap_reports(stats, n_resamples=100, seed=0, reference="bad")
    row = bt[(bt.model == "good") & (bt.metric == "chexbert_f1_14_micro")].iloc[0]
    full = chexbert_f1(chex.label(good), chex.label(refs))["chexbert_f1_14_micro"]
    assert row.value == pytest.approx(full) == pytest.approx(1.0)              # identical reports: identical labels
    assert row.ci_low <= row.value <= row.ci_high and row.delta >= 0
    assert {"chexbert_f1_5_micro", "chexbert_f1_14_macro", "chexbert_f1_5_macro", "chexbert_f1_no_finding"} <= set(bt.metric)
    assert "chexbert_f1_14_micro" not in set(bootstrap_reports(report_stats(good, refs), n_resamples=10).metric)


def test_experiment_adds_chexbert_rows_on_real_reports(folder, tmp_path):
    "A rendered phantom set passed as a manifest counts as real data: the tiny CheXbert labels both sides."
    from xr0_lib.experiments import manifest_or_phantom, run_experiment
    man = manifest_or_phantom(None, tmp_path / "data", 120, 56, 0)
    params = {"n_images": 120, "image_size": 56, "epochs": 1, "lm_epochs": 1, "n_resamples": 20, "fractions": [1.0],
              "max_new_tokens": 20, "random_control": False, "manifest": str(man), "chexbert": str(folder)}
    res = run_experiment("report_generation", tmp_path / "run", params, timeout=900)
    assert res["chexbert"]["used"] and res["chexbert"]["source"].endswith("chexbert.pth"), res["chexbert"]
    assert res["radgraph"] == {"used": False, "note": RADGRAPH_SKIP}
    metrics = {m["metric"] for m in res["metrics"]}
    assert {"chexbert_f1_14_micro", "chexbert_f1_5_micro", "chexbert_f1_atelectasis"} <= metrics
    assert "chexbert_f1_5_macro" in (tmp_path / "run" / "report_generation_chexbert.md").read_text()
