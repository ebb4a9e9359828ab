"""Text and overlap metrics against hand-computed values and reference implementations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.eval import metrics_overlap as overlap
from tunelab.eval.metrics import score
from tunelab.eval.metrics_text import exact_match, json_field_accuracy, label_scores, normalize, parse_json_answer

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------- normalisation and exact match

def test_normalize_steps_cover_width_case_and_chinese_punctuation():
    assert normalize("  ＡＢＣ１２３！ ", "width,strip") == "ABC123!"
    assert normalize("Hello, World!", "lower,punct") == "hello world"
    assert normalize("急性阑尾炎，未特指。", "punct") == "急性阑尾炎未特指"
    assert normalize("“肺炎”（左侧）", "punct") == "肺炎左侧"
    assert normalize("a \t b\n", "space,strip") == "a b"
    with pytest.raises(TunelabError, match="normalisation 'bogus'"):
        normalize("x", "strip,bogus")


def test_exact_match_default_strip_and_configurable_normalisation():
    preds = [" Paris ", "paris", "急性阑尾炎。", "K35.80"]
    refs = ["Paris", "Paris", "急性阑尾炎", ["K35.8", "K35.80"]]
    assert exact_match(preds, refs)["em"] == pytest.approx(2 / 4)  # strip only: case and 。 matter
    assert exact_match(preds, refs, "strip,lower,punct")["em"] == pytest.approx(4 / 4)
    with pytest.raises(TunelabError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


# ---------------------------------------------------------------- JSON fields (seed 003 report)

REPORT = {"主诉": "咳嗽三天", "现病史": "患儿三天前出现咳嗽", "辅助检查": "暂缺", "既往史": "不详",
          "诊断": "支气管炎", "建议": "多喝水"}


def test_parse_json_answer_strips_fences_and_finds_the_object():
    text = json.dumps(REPORT, ensure_ascii=False)
    assert parse_json_answer(f"好的:\n```json\n{text}\n```\n以上") == REPORT
    assert parse_json_answer(f"诊疗报告如下 {text} 谢谢") == REPORT
    assert parse_json_answer("不是JSON") is None
    assert parse_json_answer("[1, 2]") is None


def test_json_field_accuracy_counts_fields_and_unparseable_rows():
    ref = json.dumps(REPORT, ensure_ascii=False)
    wrong_one = dict(REPORT, 诊断="肺炎")
    preds = [
        "```json\n" + json.dumps(REPORT, ensure_ascii=False) + "\n```",  # all 6 right
        json.dumps(wrong_one, ensure_ascii=False),                       # 5 of 6
        "对不起，我无法生成报告",                                           # unparseable: 0 of 6
    ]
    result = json_field_accuracy(preds, [ref, ref, REPORT])
    assert result["json_field_acc"] == pytest.approx(11 / 18)
    assert result["json_unparseable"] == 1
    assert result["json_all_fields"] == pytest.approx(1 / 3)
    assert result["json_field.诊断"] == pytest.approx(1 / 3)
    assert result["json_field.主诉"] == pytest.approx(2 / 3)
    only = json_field_accuracy(preds, [ref] * 3, fields=["诊断"])
    assert only["json_field_acc"] == pytest.approx(1 / 3) and "json_field.主诉" not in only
    with pytest.raises(TunelabError, match="reference row 1: not a JSON object"):
        json_field_accuracy(["{}"], ["plain text"])


# ---------------------------------------------------------------- labels

def test_label_scores_macro_precision_recall_f1_by_hand():
    golds = ["pos", "pos", "neg", "neg", "neu"]
    preds = ["pos", "neg", "neg", "neg", "other"]
    # pos: tp1 fp0 fn1 -> P1 R.5 F.667; neg: tp2 fp1 fn0 -> P.667 R1 F.8; neu: 0, 0, 0
    result = label_scores(preds, golds)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["precision"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert result["recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert result["f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert result["label_classes"] == 3
    # Chinese labels with full-width/ASCII punctuation differences, normalised away
    zh = label_scores(["阳性。", "阴性", "阴性"], ["阳性", "阳性", "阴性"], "strip,punct")
    # 阳性: P 1/1 R 1/2 F 2/3; 阴性: P 1/2 R 1/1 F 2/3
    assert (zh["accuracy"], zh["precision"], zh["recall"]) == pytest.approx((2 / 3, 0.75, 0.75))
    assert zh["f1"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- BLEU

def test_bleu_english_by_hand():
    # 1-grams 3/4, 2-grams 2/3, same length so BP = 1
    result = overlap.bleu(["a b c d"], ["a b c e"], lang="en")
    assert result["bleu1"] == pytest.approx(75.0)
    assert result["bleu2"] == pytest.approx(100 * math.sqrt(3 / 4 * 2 / 3))
    assert result["bleu_tokenizer"] == "13a"


def test_bleu_chinese_uses_character_tokens_and_brevity_penalty():
    # every n-gram of the 6-character candidate is in the 7-character reference: BLEU = BP
    result = overlap.bleu(["猫坐在垫子上"], ["猫坐在垫子上面"])
    assert result["bleu_tokenizer"] == "zh"
    assert result["bleu4"] == pytest.approx(100 * math.exp(1 - 7 / 6), abs=1e-6)
    # without CJK tokenisation the whole sentence would be one token and score 0
    assert overlap.bleu(["猫坐在垫子上"], ["猫坐在垫子上面"], lang="en")["bleu1"] == 0.0


def test_bleu_matches_sacrebleu_with_multiple_references():
    from sacrebleu.metrics import BLEU

    preds = ["the cat sat on the mat", "a dog"]
    refs = [["the cat sat on a mat", "a cat sat on the mat"], "a dog barks"]
    expected = BLEU(tokenize="13a").corpus_score(preds, [[refs[0][0], refs[1]], [refs[0][1], None]]).score
    assert overlap.bleu(preds, refs)["bleu"] == pytest.approx(expected)


# ---------------------------------------------------------------- ROUGE

def test_rouge_english_by_hand():
    result = overlap.rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    assert result["rouge1"] == pytest.approx(5 / 6)   # the, the, cat, on, mat
    assert result["rouge2"] == pytest.approx(3 / 5)   # the cat, on the, the mat
    assert result["rougeL"] == pytest.approx(5 / 6)   # LCS: the cat on the mat


def test_rouge_chinese_uses_jieba_words_not_zero():
    from rouge_score import rouge_scorer

    pred, ref = "患者咳嗽三天", "患者咳嗽三天，伴有发热。"
    assert overlap.tokenize(pred, "zh") == ["患者", "咳嗽", "三天"]
    assert overlap.tokenize(ref, "zh") == ["患者", "咳嗽", "三天", "伴有", "发热"]
    # rouge-score's own tokenizer drops CJK: the problem this module works around
    assert rouge_scorer.RougeScorer(["rouge1"]).score(ref, pred)["rouge1"].fmeasure == 0.0
    result = overlap.rouge([pred], [ref])
    assert result["rouge1"] == pytest.approx(2 * 1 * 0.6 / 1.6)  # P 3/3, R 3/5
    assert result["rouge2"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # P 2/2, R 2/4
    assert result["rougeL"] == pytest.approx(0.75)


# ---------------------------------------------------------------- METEOR (needs WordNet)

@pytest.fixture(scope="module")
def wordnet_ready():
    from tunelab.eval.wordnet import use_wordnet

    reason = use_wordnet()
    if reason:
        pytest.skip(f"WordNet not installed here: {reason}")


def test_meteor_by_hand_uses_wordnet_synonyms(wordnet_ready):
    # identical 6 tokens: Fmean 1, one chunk -> 1 - 0.5 * (1/6)^3
    same = overlap.meteor(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["meteor"] == pytest.approx(1 - 0.5 / 6 ** 3)
    # car/auto match only through WordNet (car.n.01); all 4 words then match in one chunk.
    # (Not car/automobile: nltk compares WordNet synonyms with the Porter stem "automobil".)
    synonym = overlap.meteor(["the car is fast"], ["the auto is fast"])
    assert synonym["meteor"] == pytest.approx(1 - 0.5 / 4 ** 3)
    chinese = overlap.meteor(["患者咳嗽三天"], ["患者咳嗽三天"])
    assert chinese["meteor"] == pytest.approx(1 - 0.5 / 3 ** 3)


def test_meteor_without_wordnet_reports_unavailable_not_zero(tmp_path):
    code = (
        "from pathlib import Path\n"
        "import tunelab.eval.wordnet as w\n"
        "w.SYSTEM_WORDNET = Path('/nonexistent/wordnet')\n"
        "from tunelab.eval.metrics_overlap import meteor\n"
        "print(meteor(['a b'], ['a b'])['meteor'])\n"
    )
    env = dict(os.environ, TUNELAB_CACHE=str(tmp_path), NLTK_DATA=str(tmp_path / "none"),
               HOME=str(tmp_path), PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("unavailable: WordNet not found")


def test_lexnames_rebuilt_from_the_debian_man_page(tmp_path):
    from tunelab.eval import wordnet

    if not wordnet.LEXNAMES_MAN.is_file():
        pytest.skip("wordnet-base is not installed")
    import gzip

    text = wordnet.lexnames_from_man(gzip.decompress(wordnet.LEXNAMES_MAN.read_bytes()).decode())
    lines = text.splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1" and lines[44] == "44\tadj.ppl\t3"
    folder = wordnet.install_wordnet(target=tmp_path)
    assert (folder / "lexnames").read_text() == text
    # plain copies: NLTK >= 3.10 refuses symlinks out of its root and multiply-linked files
    for name in ("data.noun", "index.sense", "verb.exc"):
        path = folder / name
        assert not path.is_symlink() and path.stat().st_nlink == 1
        assert path.stat().st_size == (wordnet.SYSTEM_WORDNET / name).stat().st_size
    assert not list(tmp_path.glob("corpora/.wordnet-*"))  # no staging folder left behind
    # (that such a folder loads in NLTK is shown by the METEOR tests, which read it)


# ---------------------------------------------------------------- CIDEr-D

# Reference values from pycocoevalcap 1.2 (pip install --no-deps --target /tmp/pycoco pycocoevalcap):
#   Cider().compute_score({i: [" ".join(tokenize(r, lang)) for r in refs[i]]}, {i: [" ".join(tokenize(p, lang))]})
# on exactly these inputs, November 2026.
CIDER_EN = (["a cat sits on the mat", "a dog runs in the park", "two birds fly over the sea", "a man"],
            [["a cat is sitting on the mat", "the cat sat on a mat"], ["a dog is running in a park"],
             ["birds flying above the ocean", "two birds over the sea"], ["a man riding a horse"]])
CIDER_ZH = (["患者咳嗽三天伴有发热", "建议多喝水注意休息", "诊断为支气管炎"],
            [["患者咳嗽三天，伴有发热。"], ["建议多喝水，注意休息，必要时复诊。"], ["诊断：急性支气管炎"]])


def test_cider_d_matches_pycocoevalcap_english_and_chinese():
    assert overlap.cider_d(*CIDER_EN)["cider"] == pytest.approx(2.5160012408802728, rel=1e-9)
    assert overlap.cider_d(*CIDER_ZH)["cider"] == pytest.approx(5.797649719691826, rel=1e-9)


def test_cider_d_edge_cases():
    assert overlap.cider_d(["a b c"], ["a b c"])["cider"] == 0.0  # one row: every IDF is log(1) - log(1)
    perfect = overlap.cider_d(["x y z w", "p q r s"], ["x y z w", "p q r s"])["cider"]
    assert perfect == pytest.approx(10.0)  # identical sentences, no shared n-grams across rows


# ---------------------------------------------------------------- score()

def test_score_merges_metrics_into_one_flat_dict():
    result = score(["the cat sat on the mat", "hello"], ["the cat sat on the mat", "hi"], "em,bleu,rouge,cider")
    assert result["n"] == 2 and result["lang"] == "en"
    assert result["em"] == 0.5
    assert 0 < result["bleu"] <= 100 and 0 < result["rouge1"] <= 1 and result["cider"] > 0
    with pytest.raises(TunelabError, match="unknown metric 'blue'"):
        score(["a"], ["a"], "em,blue")
    with pytest.raises(TunelabError, match="no rows"):
        score([], [], "em")
    assert score(["a"], ["a"], "perplexity")["perplexity"].startswith("unavailable")


def test_empty_predictions_and_references_score_zero_without_errors():
    result = score(["", "a b", "。"], ["a b", "", "x"], "em,bleu,rouge,cider,f1")
    assert all(result[k] == 0.0 for k in ("em", "bleu", "rouge1", "rougeL", "cider", "f1"))
    result = score(["", "你好"], ["你好", ""], "bleu,rouge,cider")
    assert result["lang"] == "zh" and result["rouge1"] == 0.0 and result["cider"] == 0.0


def test_setup_assets_never_fails_without_apt(monkeypatch, tmp_path, capsys):
    import importlib.util
    import shutil

    from tunelab.eval import wordnet

    spec = importlib.util.spec_from_file_location("setup_assets", Path(SRC).parent / "scripts" / "setup_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(wordnet, "SYSTEM_WORDNET", tmp_path / "no-wordnet")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(module, "STEPS", [module.setup_wordnet])
    assert module.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("note: WordNet not installed (apt-get not available)") and out.count("\n") == 1
    # a step that crashes is reported and skipped, the others still run
    ran = []
    monkeypatch.setattr(module, "STEPS", [lambda: 1 / 0, lambda: ran.append(True)])
    assert module.main() == 0 and ran == [True]
    assert "note: <lambda> skipped: division by zero" in capsys.readouterr().err
