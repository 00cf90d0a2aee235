"""Report generation (issue #23): the lexical metrics equal pycocoevalcap's own, the phantom labeller recovers the
phantom's truth, the prefix LM's loss covers report tokens only, LoRA leaves the base LM bitwise unchanged, tiny local
GPT-2 / Llama folders load through the same path as real ones (and bad folders are refused), greedy decoding is
deterministic, and malformed report rows are skipped and reported."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from transformers import LlamaConfig, LlamaForCausalLM

from xr0_lib.data.phantom import FINDINGS, render_phantom
from xr0_lib.eval.report_gen import (PrefixReportModel, ReportGenConfig, generate_reports, load_lm, load_report_model,
                                     pretrain_lm, report_targets, save_lm, save_report_model, small_lm, train_report_model,
                                     train_report_tokenizer)
from xr0_lib.eval.report_metrics import (bootstrap_reports, corpus_scores, label_report, most_common_report, report_stats,
                                         tokenize_report)

torch.set_num_threads(1)

REPORTS = ["PA radiograph of the chest. Heart size is normal. The lungs are clear.",
           "Lateral radiograph of the left knee. No fracture.",
           "AP radiograph of the right elbow. Subtle fracture of the radial head.",
           "PA radiograph of the chest. Small left pleural effusion. No pneumothorax.",
           "Lateral radiograph of the chest. Enlarged cardiac silhouette (cardiothoracic ratio 0.58). No pleural effusion or pneumothorax."]


def coco(hyps, refs):
    gts = {i: [tokenize_report(x) for x in ([r] if isinstance(r, str) else r)] for i, r in enumerate(refs)}
    res = {i: [tokenize_report(h)] for i, h in enumerate(hyps)}
    return Bleu(4).compute_score(gts, res, verbose=0)[0], Rouge().compute_score(gts, res), Cider().compute_score(gts, res)


def random_pairs(rng, n):
    words = "the heart lungs are clear no pleural effusion small left right fracture of chest knee normal size".split()
    sent = lambda: " ".join(rng.choice(words, rng.integers(1, 12)))
    refs = [[sent() for _ in range(rng.integers(1, 4))] for _ in range(n)]
    return [sent() if rng.random() > 0.1 else "" for _ in range(n)], refs


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_pycocoevalcap(seed):
    rng = np.random.default_rng(seed)
    hyps, refs = random_pairs(rng, 25)
    sc = corpus_scores(report_stats(hyps, refs))
    bl, (rg, rg_each), (ci, ci_each) = coco(hyps, refs)
    np.testing.assert_allclose([sc[f"bleu{k}"] for k in (1, 2, 3, 4)], bl, rtol=1e-12, atol=1e-15)
    assert sc["rougeL"] == pytest.approx(rg, abs=1e-12) and sc["cider"] == pytest.approx(ci, abs=1e-12)
    # a subset's BLEU is the corpus BLEU of that subset; its CIDEr keeps the whole set's document frequencies
    s = report_stats(hyps, refs); idx = rng.integers(0, 25, 10)
    sub = corpus_scores(s, idx)
    np.testing.assert_allclose([sub[f"bleu{k}"] for k in (1, 2, 3, 4)], coco([hyps[i] for i in idx], [refs[i] for i in idx])[0],
                               rtol=1e-12, atol=1e-15)
    assert sub["cider"] == pytest.approx(np.mean(np.asarray(ci_each)[idx]), abs=1e-12)
    assert sub["rougeL"] == pytest.approx(np.mean(np.asarray(rg_each)[idx]), abs=1e-12)


def test_metric_edges():
    same = corpus_scores(report_stats(REPORTS, REPORTS))
    assert same["bleu1"] == pytest.approx(1) and same["bleu4"] == pytest.approx(1) and same["rougeL"] == pytest.approx(1)
    assert same["cider"] == pytest.approx(10, abs=1e-6)
    empty = corpus_scores(report_stats([""] * 3, REPORTS[:3]))
    assert all(empty[k] == pytest.approx(0, abs=1e-9) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider"))
    one = corpus_scores(report_stats(["no fracture"], ["No fracture."]))
    assert one["bleu1"] == pytest.approx(1) and one["bleu4"] < 1e-3          # no 3-grams: BLEU-4 collapses, as in pycocoevalcap
    assert tokenize_report("Ratio 0.55, HEART!") == "ratio 0.55 heart"
    with pytest.raises(ValueError, match="reference 1 is empty"): report_stats(["a", "b"], ["a", "  "])


def test_labeller_recovers_phantom_truth():
    bad = []
    for i in range(60):
        _, a = render_phantom(i, 40, 3)
        r, lab = label_report(a["report"]), a["labels"]
        bad += [(i, k, r[k], lab[k]) for k in FINDINGS if lab[k] is not None and r[k] != lab[k]]
        bad += [(i, k, r[k], lab[k]) for k in ("anatomy", "view", "laterality") if r[k] != lab[k]]
    assert not bad, bad[:5]


def test_bootstrap_pairs_and_baseline():
    refs = REPORTS * 8
    good, base = report_stats(refs, refs, label_report), report_stats([most_common_report(refs)] * len(refs), refs, label_report)
    bt = bootstrap_reports({"model": good, "copy": good, "most common": base}, n_resamples=100, seed=1, reference="most common",
                           groups=np.repeat(np.arange(8), 5))
    f1 = bt[bt.metric == "finding_f1"].set_index("model")
    assert f1.loc["model", "delta_ci_low"] > 0 and f1.loc["model", "value"] == 1.0
    np.testing.assert_array_equal(bt[bt.model == "model"].replicates.iloc[0], bt[bt.model == "copy"].replicates.iloc[0])
    assert (bt.ci_low <= bt.value + 1e-12).all() and (bt.value <= bt.ci_high + 1e-12).all()


@pytest.fixture(scope="module")
def tiny():
    tok = train_report_tokenizer(REPORTS * 4, vocab_size=300)
    lm = small_lm(tok, n_layer=2, n_embd=32, n_head=2, n_positions=128, seed=0)
    pretrain_lm(lm, tok, REPORTS * 4, epochs=2, batch_size=8, lr=3e-3)
    vis = np.random.default_rng(0).normal(size=(10, 3, 8)).astype(np.float32)
    return tok, lm, vis, (REPORTS * 2)[:10]


def test_loss_only_on_report_tokens(tiny):
    tok, lm, vis, txt = tiny
    m = PrefixReportModel(lm, tok, 8, ReportGenConfig(projector="linear"))
    seen = {}
    orig = m.lm.forward
    def spy(**kw): seen.update(kw); return orig(**kw)
    m.lm.forward = spy
    b = tok([" " + t + tok.eos_token for t in txt[:3]], add_special_tokens=False, padding=True, return_tensors="pt", padding_side="right")
    m(torch.tensor(vis[:3]), b["input_ids"], b["attention_mask"])
    P = 3 + len(m.prompt_ids)
    lab = seen["labels"]
    assert (lab[:, :P] == -100).all()                                           # visual and prompt positions
    assert torch.equal(lab[:, P:], b["input_ids"].masked_fill(b["attention_mask"] == 0, -100))   # report tokens; padding ignored
    assert (lab[:, P:] == -100).sum() == (b["attention_mask"] == 0).sum() > 0


def _base_weights(model):
    lm = model.lm.get_base_model() if model.cfg.lm_mode == "lora" else model.lm
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in lm.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_lm_modes(tiny, mode, tmp_path):
    tok, _, vis, txt = tiny
    lm = small_lm(tok, n_layer=2, n_embd=32, n_head=2, n_positions=128, seed=0)
    m = PrefixReportModel(lm, tok, 8, ReportGenConfig(lm_mode=mode, lora_r=2, epochs=2, batch_size=5, lr_lm=1e-2, max_new_tokens=12))
    before = _base_weights(m)
    train_report_model(m, vis, txt)
    after = _base_weights(m)
    same = all(torch.equal(before[k], after[k]) for k in before)
    assert same == (mode != "full"), mode                                        # LoRA and frozen: base bitwise unchanged
    m2 = load_report_model(save_report_model(m, tmp_path / mode))
    assert generate_reports(m2, vis[:4]) == generate_reports(m, vis[:4])


def test_greedy_is_deterministic(tiny):
    tok, lm, vis, _ = tiny
    m = PrefixReportModel(lm, tok, 8, ReportGenConfig(max_new_tokens=15))
    a, b = generate_reports(m, vis, batch_size=3), generate_reports(m, vis, batch_size=10)
    assert a == b == generate_reports(m, vis, batch_size=3)
    assert generate_reports(m, vis[:4], decoding="sample", seed=5) == generate_reports(m, vis[:4], decoding="sample", seed=5)


def test_local_lm_folders(tiny, tmp_path):
    tok, lm, vis, txt = tiny
    ll = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    for name, model in (("gpt2", lm), ("llama", ll)):
        t, m = load_lm(save_lm(tok, model, tmp_path / name))
        pm = PrefixReportModel(m, t, 8, ReportGenConfig(lm_mode="lora", lora_r=2, epochs=1, batch_size=5, max_new_tokens=6))
        train_report_model(pm, vis, txt)
        assert len(generate_reports(pm, vis[:2])) == 2
    lm.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(FileNotFoundError, match="no_tokenizer: no tokenizer"): load_lm(tmp_path / "no_tokenizer")
    for f in ("config.json", "tokenizer_config.json"):
        d = save_lm(tok, lm, tmp_path / f"remote_{f}")
        c = json.loads((d / f).read_text()); c["auto_map"] = {"AutoModelForCausalLM": "x.Y"}; (d / f).write_text(json.dumps(c))
        with pytest.raises(ValueError, match=f"remote_{f}.*trust_remote_code"): load_lm(d)
    with pytest.raises(FileNotFoundError, match="no such folder"): load_lm(tmp_path / "missing")


def test_malformed_report_rows_are_skipped():
    df = pd.DataFrame(dict(image_id=list("abcdef"), split=["train"] * 6,
                           report=[REPORTS[0], None, "", b"\xff\xfe", "x" * 30_000, "FINDINGS: " + REPORTS[1]]))
    tg, sk = report_targets(df)
    assert list(tg.row) == [0, 5] and tg.text.iloc[1] == REPORTS[1]
    assert list(sk.row) == [1, 2, 3, 4] and list(sk.image_id) == list("bcde")
    assert sk.reason.str.contains("empty|UTF-8|too long").all()
