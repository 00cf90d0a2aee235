"""Image–report alignment (eval.text, eval.alignment, experiments/align): the InfoNCE loss against references, the
clamped temperature, gathered negatives on 2 gloo processes, report preprocessing and bad reports, a local BERT
folder, resume, and the align experiment end to end through papermill."""
import json
import math
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import BertConfig, BertModel, BertTokenizerFast
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from xr0_lib.data.manifest import load_manifest
from xr0_lib.data.phantom import make_phantom_dataset
from xr0_lib.eval.alignment import ClipAligner, MAX_LOGIT_SCALE, align_preset, clip_loss, train_alignment
from xr0_lib.eval.text import TextConfig, preprocess_report, short_report_pairs, text_encoder
from xr0_lib.experiments import run_experiment
from xr0_lib.models.backbones import ModelConfig, build_backbone, load_backbone


def brute_force_infonce(a, b, scale):
    "Symmetric InfoNCE by explicit sums over pairs (float64)."
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    n, tot = len(a), 0.0
    for i in range(n):
        tot -= math.log(math.exp(scale * a[i] @ b[i]) / sum(math.exp(scale * a[i] @ b[j]) for j in range(n)))
        tot -= math.log(math.exp(scale * b[i] @ a[i]) / sum(math.exp(scale * b[i] @ a[j]) for j in range(n)))
    return tot / (2 * n)


def open_clip_style(a, b, scale):
    "open_clip's ClipLoss on one rank: logits_per_image / logits_per_text, mean of the two cross-entropies."
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    lpi, lpt = scale * a @ b.T, scale * b @ a.T
    y = torch.arange(len(a))
    return (F.cross_entropy(lpi, y) + F.cross_entropy(lpt, y)) / 2


@pytest.mark.parametrize("n,d,t", [(4, 8, 0.07), (9, 16, 1.0), (16, 32, 0.01)])
def test_infonce_equals_references(n, d, t):
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ls = torch.tensor(math.log(1 / t))
    got = clip_loss(a, b, ls)
    assert abs(got.item() - brute_force_infonce(a, b, 1 / t)) < 1e-4 * max(1, got.item())
    torch.testing.assert_close(got, open_clip_style(a, b, ls.exp()))
    # transformers' CLIP helper takes logits_per_text (text x image)
    sim = ls.exp() * F.normalize(b, dim=-1) @ F.normalize(a, dim=-1).T
    torch.testing.assert_close(got, image_text_contrastive_loss(sim))


def tiny_aligner(texts, img_size=28):
    tok, tm = text_encoder(TextConfig(vocab_size=200, hidden_size=32, intermediate_size=64), texts)
    return ClipAligner(build_backbone(ModelConfig(arch="xr0-vitp14"), img_size=img_size, seed=0), tm, proj_dim=16), tok


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    d = tmp_path_factory.mktemp("ph")
    df = load_manifest(make_phantom_dataset(d, n=24, size=56, workers=1, show_progress=False))
    return df, short_report_pairs(df)[0]


def test_temperature_stays_clamped(phantom):
    df, pairs = phantom
    m, tok = tiny_aligner(list(pairs.text))
    with torch.no_grad(): m.logit_scale.fill_(MAX_LOGIT_SCALE - 0.01)
    hist = train_alignment(m, tok, pairs, df.abs_path, align_preset("phantom", epochs=2, batch_size=8, lr_proj=1.0))
    assert all(h["logit_scale"] <= 100 + 1e-3 for h in hist), hist
    assert 0 <= m.logit_scale.item() <= MAX_LOGIT_SCALE + 1e-6
    with torch.no_grad(): m.logit_scale.fill_(-3.0)
    assert m.clamp_().logit_scale.item() == 0.0        # open_clip's lower bound: inverse temperature >= 1


def test_augment_is_checked_and_none_trains(phantom):
    df, pairs = phantom
    m, tok = tiny_aligner(list(pairs.text))
    hist = train_alignment(m, tok, pairs, df.abs_path, align_preset("phantom", epochs=1, batch_size=8, augment="none"))
    assert np.isfinite(hist[0]["loss"])
    with pytest.raises(ValueError, match="augment"):
        train_alignment(m, tok, pairs, df.abs_path, align_preset("phantom", epochs=1, augment="strong"))


def test_presets_keep_xr0_recipe_and_say_what_the_phantom_changes():
    x, p = align_preset("xr0"), align_preset("phantom")
    assert (x.lr_proj, x.lr_encoder, x.init_temperature, x.augment, x.epochs) == (1e-4, 1e-5, 0.07, "global", 100)
    assert p.init_temperature > x.init_temperature and p.lr_encoder > x.lr_encoder and p.augment == "none"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _rank_loss(rank, world, port, a, b, ls, out, ids=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = len(a) // world
        la, lb = a[rank * n:(rank + 1) * n].clone().requires_grad_(), b[rank * n:(rank + 1) * n].clone().requires_grad_()
        loss = clip_loss(la, lb, ls, text_ids=None if ids is None else ids[rank * n:(rank + 1) * n])
        loss.backward()
        torch.save(dict(loss=loss.detach(), ga=la.grad, gb=lb.grad), f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


# None: CLIP's loss; ids: rows 1 and 6 (on different ranks) and 2 and 3 share a text, so positives span ranks
@pytest.mark.parametrize("ids", [None, [0, 1, 2, 2, 4, 5, 1, 7]])
def test_gathered_negatives_two_gloo_processes_equal_one_process(tmp_path, ids):
    g = torch.Generator().manual_seed(0)
    a, b, ls = torch.randn(8, 12, generator=g), torch.randn(8, 12, generator=g), torch.tensor(2.0)
    ids = None if ids is None else torch.tensor(ids)
    mp.spawn(_rank_loss, args=(2, _free_port(), a, b, ls, str(tmp_path), ids), nprocs=2, join=True)
    ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = clip_loss(ra, rb, ls, text_ids=ids); ref.backward()
    if ids is not None: assert abs(ref.item() - clip_loss(a, b, ls).item()) > 1e-3   # the repeated texts do change the loss
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], ref.detach())
        # every rank computes the global loss; the gather's backward sums over ranks (DDP's averaging undoes the x2)
        torch.testing.assert_close(got["ga"], 2 * ra.grad[r * 4:(r + 1) * 4])
        torch.testing.assert_close(got["gb"], 2 * rb.grad[r * 4:(r + 1) * 4])


HAND_WRITTEN = {
    # preamble before FINDINGS dropped; IMPRESSION heading becomes a break; "No effusion." (2 words) merges forward
    ("FINAL REPORT\nEXAMINATION: CHEST (PA AND LAT)\nINDICATION: ___ with cough.\nTECHNIQUE: PA and lateral.\n"
     "FINDINGS: Heart size is normal. No effusion. The lungs are clear without consolidation. "
     "There is a 13 mm nodule in the right upper zone.\nIMPRESSION: No acute cardiopulmonary process."):
        ["Heart size is normal. No effusion. The lungs are clear without consolidation.",
         "There is a 13 mm nodule in the right upper zone. No acute cardiopulmonary process."],
    # no FINDINGS: text after REPORT kept; list markers removed; decimals not split; short last sentence merges back
    "Clinical history: fall.\nREPORT:\n1. Cardiothoracic ratio 0.55. 2. Small left effusion. 3. Stable.":
        ["Cardiothoracic ratio 0.55. Small left effusion. Stable."],
    # no headings at all (the phantom): whole text, paired sentences
    "PA radiograph of the chest. Moderate right pleural effusion. No pneumothorax. The lungs are clear.":
        ["PA radiograph of the chest. Moderate right pleural effusion.", "No pneumothorax. The lungs are clear."],
    "findings:\nNormal.": ["Normal."],
}


@pytest.mark.parametrize("report", list(HAND_WRITTEN))
def test_report_preprocessing_hand_written(report):
    assert preprocess_report(report) == HAND_WRITTEN[report]


def test_malformed_reports_are_reported_with_their_row_and_skipped():
    good = "PA radiograph of the chest. Heart size is normal. The lungs are clear."
    df = pd.DataFrame(dict(image_id=list("abcdef"), study_id=list("abcdef"), split=["train"] * 6,
                           report=[good, "", b"\xc3\x28 invalid", "x " * 50_000, float("nan"), "   \n "]))
    pairs, skipped = short_report_pairs(df)
    assert list(skipped.row) == [1, 2, 3, 4, 5] and list(skipped.image_id) == list("bcdef")
    reasons = dict(zip(skipped.row, skipped.reason))
    assert "empty" in reasons[1] and "UTF-8" in reasons[2] and "too long" in reasons[3] and "empty" in reasons[4]
    assert set(pairs.image_ids.sum()) == {"a"} and len(pairs) == 2


def test_tiny_local_bert_folder_loads_like_pubmedbert(tmp_path):
    "A folder as a PubMedBERT download looks (config.json, vocab.txt, tokenizer files, weights) goes through TextConfig.path."
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "heart", "size", "is", "normal", "no", "effusion", ".", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    tok, tm = text_encoder(TextConfig(path=str(tmp_path)))
    assert tok("heart size is normal.")["input_ids"] == [2, 5, 6, 7, 8, 11, 3]
    m = ClipAligner(build_backbone(ModelConfig(arch="xr0-vitp14"), img_size=28, seed=0), tm, proj_dim=8)
    x = tok(["no effusion.", "heart size is normal."], return_tensors="pt", padding=True)
    assert m.encode_text(x["input_ids"], x["attention_mask"]).shape == (2, 8)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        text_encoder(TextConfig(path=str(tmp_path / "missing")))


def test_training_resumes_after_an_interruption(phantom, tmp_path):
    df, pairs = phantom
    cfg = align_preset("phantom", epochs=1, batch_size=8)
    m, tok = tiny_aligner(list(pairs.text))
    train_alignment(m, tok, pairs, df.abs_path, cfg, out_dir=tmp_path)            # "interrupted" after epoch 0
    first = json.loads((tmp_path / "align_progress.json").read_text())["history"]
    m2, _ = tiny_aligner(list(pairs.text))
    hist = train_alignment(m2, tok, pairs, df.abs_path, align_preset("phantom", epochs=2, batch_size=8), out_dir=tmp_path)
    assert [h["epoch"] for h in hist] == [0, 1] and hist[0] == first[0]
    # the restarted model began from the saved weights, not from its own init
    m3, _ = tiny_aligner(list(pairs.text))
    assert not torch.equal(m2.image_proj.weight, m3.image_proj.weight)


def test_align_experiment_tiny(tmp_path):
    params = dict(n_images=64, image_size=56, backbone="xr0-vitp14", epochs=2, batch_size=16, text_hidden=32, n_boot=50,
                  ks=[1, 5, 10])
    res = run_experiment("align", tmp_path, params, timeout=300)
    tidy = pd.DataFrame(res["metrics"])
    assert {"task", "backbone", "metric", "value", "ci_low", "ci_high"} <= set(tidy.columns)
    assert {"recall@1", "recall@5", "recall@10", "zeroshot_auroc"} <= set(tidy.metric)
    assert set(tidy.backbone) == {"before alignment", "aligned"}
    assert (tmp_path / "similarity_matrix.png").is_file() and (tmp_path / "skipped_reports.csv").is_file()
    assert load_backbone(tmp_path / "aligned" / "image_hf").embed_dim == 64
